"""Video codecs: what vsproxy reads of H.264 (`h264.py`) and its one shared encoder per JPEG
upstream (`encoder.py`, PyAV's libx264 in a worker thread)."""
