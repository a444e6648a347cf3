"""A throwaway Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``) on a free loopback port, for tests and demo."""

import json
import logging
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

logger = logging.getLogger(__name__)

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
BOOT_SECONDS = 30


def free_port():
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class OrthancServer:
    """Orthanc with its storage, index and one config file in ``folder``; DICOMweb at ``dicomweb_url``.

    Pitfalls this avoids: misspelt keys are silently ignored (the config is written from one dict); Orthanc is
    given one file, not /etc/orthanc (it would merge every JSON there); ``DicomWeb.Host`` is left unset (it drops
    the custom port from retrieve URLs).
    """

    def __init__(self, folder, *, port=None, stable_age=1):
        self.folder = Path(folder)
        self.port = port or free_port()
        self.stable_age = stable_age
        self.log_path = self.folder / "orthanc.log"
        self.process = None

    @property
    def base_url(self):
        """Orthanc's REST root."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb_url(self):
        """The DICOMweb root, as the worker is given it."""
        return f"{self.base_url}/dicom-web"

    def config(self):
        """The configuration, as a dict."""
        return {
            "Name": "CovidScanTestPACS",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "StableAge": self.stable_age,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }

    def start(self):
        """Write the config, start Orthanc and wait until its REST API answers."""
        self.folder.mkdir(parents=True, exist_ok=True)
        config_path = self.folder / "orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=2))
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen([ORTHANC_BINARY, str(config_path)], stdout=log,
                                            stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + BOOT_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log()}")
            if self.answers():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not answer within {BOOT_SECONDS} s:\n{self.log()}")
            time.sleep(0.1)

    def answers(self):
        """Whether ``/system`` answers."""
        try:
            with urllib.request.urlopen(f"{self.base_url}/system", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def log(self):
        """What Orthanc has written so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self):
        """SIGTERM, then SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def get_json(self, path):
        """GET a REST path of Orthanc and parse its JSON."""
        with urllib.request.urlopen(f"{self.base_url}{path}", timeout=30) as response:
            return json.loads(response.read())
