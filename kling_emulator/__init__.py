"""kling-emulator: a local Kling API server (FastAPI + uvicorn) that renders real MP4s.

Written from the API reference and importing nothing from the project, so it checks the client.
"""

from kling_emulator.server import EmulatorConfig, EmulatorHandle, running_emulator, start_emulator

__all__ = ["EmulatorConfig", "EmulatorHandle", "running_emulator", "start_emulator"]
