"""Starting and stopping: the real `kling-emulator serve` CLI, and the in-process helper."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from kling_emulator import EmulatorConfig, running_emulator, start_emulator

CLI = str(Path(sys.executable).with_name("kling-emulator"))


def wait_for(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "kling-emulator exited early"
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("kling-emulator did not answer")


def test_cli_serves_an_authenticated_request(tmp_path: Path, tools: Any) -> None:
    AK, SK, make_token = tools.AK, tools.SK, tools.make_token
    port = tools.free_port()
    faults = tmp_path / "faults.yaml"
    faults.write_text("rules:\n  - {match: 'create:image2video', kind: http_error, times: 1,"
                      " params: {status: 429, code: 1302}}\n")
    args = [CLI, "serve", "--host", "127.0.0.1", "--port", str(port), "--provider", "kling",
            "--access-key", AK, "--secret-key", SK, "--time-scale", "0.002", "--concurrency", "3",
            "--faults", str(faults), "--state-dir", str(tmp_path / "state")]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/_emulator/stats", process)
        headers = {"Authorization": f"Bearer {make_token()}"}
        created = httpx.post(f"{base}/v1/videos/text2video", json={"prompt": "a boat"}, headers=headers)
        assert created.status_code == 200, created.text
        assert created.json()["data"]["task_status"] == "submitted"
        # The --faults file is in force: the first image2video create is refused as configured.
        refused = httpx.post(f"{base}/v1/videos/image2video", json={"image": "https://example.invalid/a.png"},
                             headers=headers)
        assert (refused.status_code, refused.json()["code"]) == (429, 1302)
        assert httpx.post(f"{base}/v1/videos/text2video", json={"prompt": "x"}).json()["code"] == 1001
        assert (tmp_path / "state" / "tasks.json").is_file()
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    assert tools.port_is_free(port)


def test_cli_cometapi_mode(tmp_path: Path, tools: Any) -> None:
    port = tools.free_port()
    args = [CLI, "serve", "--port", str(port), "--provider", "cometapi", "--api-key", "comet-key-0123456789"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/_emulator/stats", process)
        ok = httpx.post(f"{base}/kling/v1/videos/text2video", json={"prompt": "a boat"},
                        headers={"Authorization": "Bearer comet-key-0123456789"})
        assert ok.status_code == 200, ok.text
        task_id = ok.json()["data"]["task_id"]
        url = f"{base}/kling/v1/videos/text2video/{task_id}"
        assert httpx.get(url, headers={"Authorization": "Bearer comet-key-0123456789"}).json()["code"] == 0
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def test_cli_weak_provider_flags_and_padding(tools: Any) -> None:
    port = tools.free_port()
    args = [CLI, "serve", "--port", str(port), "--access-key", tools.AK, "--secret-key", tools.SK,
            "--time-scale", "0.001", "--lookup-query", "empty", "--lookup-path", "off", "--no-unique-external-ids",
            "--queued-status-word", "queueing", "--pad-bytes", "4096"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{base}/_emulator/stats", process)
        assert httpx.get(f"{base}/_emulator/behaviour").json() == {
            "lookup_query": "empty", "lookup_path": "off", "unique_external_ids": False,
            "queued_status_word": "queueing"}
        headers = {"Authorization": f"Bearer {tools.make_token()}"}
        created = httpx.post(f"{base}/v1/videos/text2video", json={"prompt": "a boat"}, headers=headers)
        assert created.json()["data"]["task_status"] == "queueing"
        path = f"{base}/v1/videos/text2video/{created.json()['data']['task_id']}"
        video = tools.until(lambda: httpx.get(path, headers=headers).json()["data"]["task_result"].get("videos"),
                            what="the video")[0]
        served = httpx.get(video["url"]).content
        assert served[-4096:-4088] == (4096).to_bytes(4, "big") + b"free"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)


def test_cli_refuses_a_bad_switch() -> None:
    for flags in (["--lookup-query", "sometimes"], ["--pad-bytes", "4"]):
        done = subprocess.run([CLI, "serve", "--port", "0", *flags], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "lookup_query" in done.stderr or "pad_bytes" in done.stderr, done.stderr


def test_in_process_helper_binds_a_free_port_and_frees_it(tools: Any) -> None:
    AK, SK, make_token = tools.AK, tools.SK, tools.make_token
    port_is_free, free_port = tools.port_is_free, tools.free_port
    handle = start_emulator(EmulatorConfig(access_key=AK, secret_key=SK))
    port = int(handle.base_url.rsplit(":", 1)[1])
    assert not port_is_free(port)
    assert httpx.get(f"{handle.base_url}/_emulator/stats").status_code == 200
    handle.stop()
    assert port_is_free(port), "the port is released after stop()"
    # The context-manager form, on a port chosen by the caller.
    chosen = free_port()
    with running_emulator(port=chosen, access_key=AK, secret_key=SK) as emu:
        assert emu.base_url == f"http://127.0.0.1:{chosen}"
        headers = {"Authorization": f"Bearer {make_token()}"}
        response = httpx.get(f"{emu.base_url}/v1/videos/text2video", headers=headers)
        assert response.json()["data"] == []
    assert port_is_free(chosen)
