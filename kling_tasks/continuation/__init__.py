"""Last-frame continuation: the frame a continuation starts from, and the clips joined into one video.

Local work only (PyAV): nothing here sends a Kling request or imports Prefect.
"""
