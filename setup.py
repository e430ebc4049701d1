"""reflservd: a remote fitting queue for refl1d, as Twisted daemons."""

from setuptools import setup

# The versions tested together (Python 3.11). Keep in step with the Makefile.
REQUIRES = [
    "twisted==26.10.0",
    "klein==24.8.0",
    "treq==26.7.0",
    "prometheus-client==0.26.0",
    "multipart==2.0.1",
    "orjson==3.13.0",
    "numpy==2.4.6",
    "bumps==1.0.4",
    "refl1d==1.0.1",
    "matplotlib==3.11.2",
]

setup(
    name="reflservd",
    version="0.1.0",
    description="Remote fitting queue for refl1d: server, workers, CLI",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.11,<3.12",
    packages=["reflservd", "reflworkerd", "reflworkerd.sandbox", "twisted.plugins"],
    package_data={
        "reflservd": ["static/*", "templates/*", "demodata/*"],
        "reflworkerd": [],
    },
    install_requires=REQUIRES,
    extras_require={
        "test": [
            "pytest==9.2.0",
            "pytest-timeout==2.4.0",
            "hypothesis==6.170.17",
            "schemathesis==4.32.5",
            "aiosmtpd==1.4.6",
            "selenium==4.38.0",
        ],
        # Fits with the job option mpi (the slurm backend): built from source against
        # the node's Open MPI (Debian: libopenmpi-dev; pip --no-binary mpi4py, as
        # `make venv` does: PyPI's wheel brings no Open MPI of Debian's).
        "mpi": ["mpi4py==4.1.2"],
    },
    entry_points={
        "console_scripts": [
            "reflq = reflservd.cli:main",
            "reflservd-journal = reflservd.journalctl:main",
        ],
    },
)
