"""Packaging for vsproxy. `pip install .` installs the `vsproxy` command; `.[test]` the test tools."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = {}
exec((HERE / "vsproxy" / "__init__.py").read_text(), VERSION)

setup(
    name="vsproxy",
    version=VERSION["__version__"],
    description="Video stream proxy for robot simulators: one upstream connection, many browser viewers.",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    # The operator dashboard's static files live in the top-level dashboard/ folder; installed,
    # they become the data-only package `vsproxy_dashboard` (vsproxy/handlers/dashboard.py finds
    # the checkout's folder first, then this package).
    packages=[*find_packages(include=["vsproxy", "vsproxy.*"]), "vsproxy_dashboard"],
    package_dir={"vsproxy_dashboard": "dashboard"},
    package_data={"vsproxy.web": ["*.html"], "vsproxy_dashboard": ["*.html", "*.js", "*.css", "*.md"]},
    install_requires=[
        "tornado>=6.4,<7",
        "PyYAML>=6.0",
        "prometheus-client>=0.20",
        "Pillow>=10.1",
        # H.264: the shared encoder of JPEG upstreams (libx264), RTSP upstreams (FFmpeg's RTSP
        # client and decoders). Its wheels bundle FFmpeg, nothing to compile.
        "av>=18,<19",
        # WebRTC out (WHEP): ICE, DTLS, SRTP and RTP packetization in Python on the asyncio loop.
        # vsproxy hooks two methods of its RTCRtpSender instances (see vsproxy/outputs/webrtc.py).
        "aiortc>=1.16,<2",
        # A cluster of nodes (cluster.redis_url): the shared session registry, leases and control
        # messages; its asyncio client (redis.asyncio). Imported only when a cluster is configured.
        "redis>=5",
    ],
    extras_require={
        "rtsp": [],  # PyAV is a regular dependency now; kept so `pip install "vsproxy[rtsp]"` still works
        "test": [
            "pytest>=8,<10",  # pytest-tornado 0.8.1 uses hooks pytest 10 removes
            "pytest-tornado==0.8.1",
            "setuptools<82",  # pytest-tornado imports pkg_resources, gone in setuptools 82
            "playwright>=1.45",  # drives Debian's chromium; never `playwright install`
            "hypothesis>=6.100",
            "numpy",  # vsproxy.publish accepts numpy RGB arrays (optional at run time)
            "schemathesis>=4,<5",  # fuzzes the live server from its OpenAPI document
            "openapi-spec-validator>=0.7",
            "jsonschema>=4.18",  # real responses checked against the OpenAPI schemas
            "trustme>=1.1",  # a throwaway CA and certificates for the TLS tests
            "ruff>=0.6",
        ],
    },
    entry_points={"console_scripts": ["vsproxy = vsproxy.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Framework :: Tornado",
        "License :: OSI Approved :: MIT License",
    ],
)
