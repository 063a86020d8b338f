"""One tree of errors, split by what the caller should do (reference §11, DESIGN §3).

Classification uses Kling's body ``code``, never the HTTP status alone: HTTP 429 is both 1102 (pack used up,
fatal) and 1303 (too many tasks, back off). The status is only a fallback when the body is not Kling JSON.
Errors never carry request headers, so a JWT or bearer key cannot end up in ``str()``/``repr()`` or logs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from kling_tasks.api.models import TaskSnapshot

__all__ = [
    "AccountError",
    "AmbiguousSubmitError",
    "AuthError",
    "BackPressureError",
    "ConfigError",
    "ContentPolicyError",
    "IPNotAllowedError",
    "InvalidRequestError",
    "KlingError",
    "KlingProtocolError",
    "LookupUnsupportedError",
    "NotFoundError",
    "ServerError",
    "TaskFailedError",
    "TransportError",
    "WaitTimeoutError",
    "error_for_code",
    "error_for_status",
]


class KlingError(Exception):
    """Base of every error the client raises. ``retryable``: may the same call succeed later?"""

    retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        request_id: str | None = None,
        http_status: int | None = None,
        code: int | None = None,
        task_id: str | None = None,
        external_task_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.http_status = http_status
        self.code = code
        self.task_id = task_id
        self.external_task_id = external_task_id

    def _details(self) -> list[str]:
        parts = [
            f"{name}={value}"
            for name, value in (
                ("code", self.code),
                ("http_status", self.http_status),
                ("request_id", self.request_id),
                ("task_id", self.task_id),
                ("external_task_id", self.external_task_id),
            )
            if value is not None
        ]
        return parts

    # The pipeline step the error stopped (e.g. "extend-1-of-2"), set by the layer that knows it: a stop is then
    # one line naming the step as well as Kling's code. The client layer itself knows no steps.
    step: str | None = None

    def __str__(self) -> str:
        details = self._details()
        text = f"{self.message} ({', '.join(details)})" if details else self.message
        return f"{self.step}: {text}" if self.step else text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable (Prefect may persist a failed task's exception) despite keyword-only constructors.
        return (_rebuild, (type(self), self.args, self.__dict__.copy()))


def _rebuild(cls: type[KlingError], args: tuple[Any, ...], state: dict[str, Any]) -> KlingError:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class ConfigError(KlingError):
    """Missing credentials or bad settings; raised before any request is sent."""


class LookupUnsupportedError(ConfigError):
    """The configured provider/setting cannot look a task up by ``external_task_id`` (lookup ``off``)."""


class AuthError(KlingError):
    """1000–1004. Fix the credentials or the clock. The client itself re-mints the JWT once on 1003/1004."""


class AccountError(KlingError):
    """1100–1103: account exception, arrears, resource pack used up, no permission. Fatal."""


class IPNotAllowedError(AccountError):
    """1304: the account's IP allow-list refuses this machine. An account setting, so fatal."""


class InvalidRequestError(KlingError):
    """1200–1203 (or a request this client refuses to send): change the request; never retried."""


class NotFoundError(InvalidRequestError):
    """1203 / bare 404: the task (or model) does not exist."""


class ContentPolicyError(KlingError):
    """1300 (platform policy) / 1301 (content safety): change the input; never retried."""


class BackPressureError(KlingError):
    """1302 (too fast) / 1303 (concurrency above the pack's limit): retry after a jittered backoff."""

    retryable = True


class ServerError(KlingError):
    """5000–5002 and other 5xx: retry with backoff (for a POST: look up first, it may exist)."""

    retryable = True


class TransportError(KlingError):
    """Connect/read/write failure. ``may_have_been_sent`` is False only when the request surely never left."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        may_have_been_sent: bool,
        task_id: str | None = None,
        external_task_id: str | None = None,
    ) -> None:
        super().__init__(message, task_id=task_id, external_task_id=external_task_id)
        self.may_have_been_sent = may_have_been_sent

    def _details(self) -> list[str]:
        return [*super()._details(), f"may_have_been_sent={self.may_have_been_sent}"]


class KlingProtocolError(KlingError):
    """The answer is not Kling's shape (success without ``data.task_id``, succeed without videos)."""


class TaskFailedError(KlingError):
    """The Kling task ended ``failed``. Not resubmitted silently (DESIGN §2.6)."""

    def __init__(self, snapshot: TaskSnapshot, *, request_id: str | None = None) -> None:
        self.task_status_msg = snapshot.task_status_msg
        self.snapshot = snapshot
        super().__init__(
            f"Kling task failed: {snapshot.task_status_msg or '(no reason given)'}",
            request_id=request_id or snapshot.request_id,
            task_id=snapshot.task_id,
            external_task_id=snapshot.external_task_id,
        )


class WaitTimeoutError(KlingError):
    """A wait deadline passed. The task may still finish at Kling: poll it again rather than resubmitting."""

    def __init__(
        self,
        message: str,
        *,
        snapshot: TaskSnapshot | None,
        task_id: str | None = None,
        external_task_id: str | None = None,
    ) -> None:
        self.snapshot = snapshot
        super().__init__(
            message,
            request_id=snapshot.request_id if snapshot else None,
            task_id=task_id or (snapshot.task_id if snapshot else None),
            external_task_id=external_task_id or (snapshot.external_task_id if snapshot else None),
        )


class AmbiguousSubmitError(KlingError):
    """A create POST may have made a task and no proven lookup can tell: never resent, never retried.

    The message names ``external_task_id`` and the way out (adopt the task id from the console, or assume
    it was not created); ``.external_task_id`` carries the id for the caller.
    """

    external_task_id: str

    def __init__(self, message: str, *, external_task_id: str, task_id: str | None = None) -> None:
        super().__init__(message, task_id=task_id, external_task_id=external_task_id)


_CODE_RANGES: list[tuple[int, int, type[KlingError]]] = [
    (1000, 1099, AuthError),
    (1100, 1199, AccountError),
    (1200, 1299, InvalidRequestError),
    (1300, 1399, ContentPolicyError),
    (5000, 5999, ServerError),
]

_EXACT: dict[int, type[KlingError]] = {
    1203: NotFoundError,
    1302: BackPressureError,
    1303: BackPressureError,
    1304: IPNotAllowedError,
}


def error_for_code(code: int, http_status: int | None = None) -> type[KlingError]:
    """The error class for a Kling body ``code``; unknown codes go by range, then by HTTP status."""
    if code in _EXACT:
        return _EXACT[code]
    for low, high, cls in _CODE_RANGES:
        if low <= code <= high:
            return cls
    return error_for_status(http_status or 0)


def error_for_status(http_status: int) -> type[KlingError]:
    """Fallback when the body is not Kling JSON (a proxy or load balancer answered)."""
    if http_status == 401:
        return AuthError
    if http_status == 403:
        return AccountError
    if http_status == 404:
        return NotFoundError
    if http_status in (408, 429):  # a gateway's own throttle or timeout: nothing was decided
        return BackPressureError if http_status == 429 else ServerError
    if http_status >= 500:
        return ServerError
    if 400 <= http_status < 500:
        return InvalidRequestError
    return KlingProtocolError
