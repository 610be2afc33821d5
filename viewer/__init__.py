"""The subscriber side: `run.py view` shows cameras' preview frames with their detections drawn.

`stream` pairs preview frames with detections per camera, `annotate` draws, `app` runs the
command (windows, recordings, snapshots).
"""
