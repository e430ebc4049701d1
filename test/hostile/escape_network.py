"""Hostile model: try to reach the network, loopback included.

Reads ``hostile.json`` from the working directory when there is one:

    {"tcpPorts": [port, …],          TCP ports listening on the host's 127.0.0.1
     "udpPorts": [port, …],          UDP ports bound on the host's 127.0.0.1
     "abstractSockets": ["name", …], abstract unix sockets (without the NUL)
     "unixSockets": ["/path", …],    unix sockets on the host's file system
     "hosts": [["1.1.1.1", 53], …]}  outside addresses

Defaults try 127.0.0.1:8080 and one public address. Writes
``hostile-report.json`` and prints it after ``HOSTILE-REPORT``; an attempt
with ``"succeeded": true`` reached something.
"""

import os
import socket
import sys

sys.path.insert(0, os.getcwd())  # hostile_common.py ships beside this script
from hostile_common import attempt, load, save  # noqa: E402

TIMEOUT = 3


def connect(family, address):
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        s.connect(address)
        s.sendall(b"hostile\n")
        return "connected to %r" % (address,)


def udp(address):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"hostile\n", address)
        return "sent to %r (delivery unknown)" % (address,)


def interfaces():
    return [name for _, name in socket.if_nameindex()]


config = load()
report = {"script": "escape_network", "attempts": {}, "finished": False}
for port in config.get("tcpPorts") or [8080]:
    attempt(report, "tcp:127.0.0.1:%d" % port, lambda: connect(socket.AF_INET, ("127.0.0.1", port)))
for port in config.get("udpPorts") or []:
    attempt(report, "udp:127.0.0.1:%d" % port, lambda: udp(("127.0.0.1", port)))
for name in config.get("abstractSockets") or []:
    attempt(report, "abstract:" + name, lambda: connect(socket.AF_UNIX, "\0" + name))
for path in config.get("unixSockets") or []:
    attempt(report, "unix:" + path, lambda: connect(socket.AF_UNIX, path))
for host, port in config.get("hosts") or [["1.1.1.1", 53]]:
    attempt(report, "tcp:%s:%d" % (host, port), lambda: connect(socket.AF_INET, (host, port)))
attempt(report, "resolve", lambda: socket.getaddrinfo("example.org", 80))
report["interfaces"] = interfaces()
report["finished"] = True
save(report)
