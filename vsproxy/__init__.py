"""vsproxy: a video stream proxy that fans one simulator stream out to many browser viewers."""

__version__ = "1.2.0"
