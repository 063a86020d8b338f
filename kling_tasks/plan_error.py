"""The one error of a plan that cannot run as given (its own module: the plan's parts all raise it)."""


class PlanError(ValueError):
    """The plan cannot run as given. Raised before any request is sent."""
