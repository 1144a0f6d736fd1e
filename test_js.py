"""Real JavaScript clients over WebSocket (SPEC §13): @stomp/stompjs in Node (with the `ws`
package) and the page examples/index.html in headless Chromium, driven by playwright-core.

They need `npm ci` (package.json) and Debian's chromium, which .ci/run installs; without them
these tests fail, saying what is missing, rather than skip.
"""

import http.server
import json
import os
import shutil
import subprocess
import threading

import pytest

from conftest import HERE, free_port

NODE_MODULES = os.path.join(HERE, "node_modules")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def node(script, *args, timeout=60):
    if shutil.which("node") is None or not os.path.isdir(os.path.join(NODE_MODULES, "@stomp")):
        pytest.fail("these tests need Node.js and `npm ci` in the checkout", pytrace=False)
    r = subprocess.run(["node", os.path.join(HERE, "jstest", script), *map(str, args)],
                       cwd=HERE, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{script} exited {r.returncode}: {r.stderr}{r.stdout}"
    return r.stdout



def test_stompjs_in_node_exchanges_acks_and_nacks(web, qname):
    tcp = web.client()
    tcp.subscribe(f"/topic/{qname}")
    tcp.send(f"/queue/{qname}", b"\x00\x01 from a TCP producer")     # binary, sent ahead
    seen = json.loads(node("node_client.mjs", f"ws://127.0.0.1:{web.ws_port}/", qname, 5))
    assert sorted(seen["bodies"]) == sorted(
        ["binary:22", "one", "nack me", "three", "nack me"]), seen
    assert seen["redelivered"] == 1
    assert tcp.message().body == b"bye from stompjs"    # WebSocket producer, TCP consumer
    assert tcp.count_msgs(qname) == 0                  # every message ACKed in the end


class PageServer:
    """examples/ and the stompjs bundle over HTTP on 127.0.0.1, the way a user serves them."""

    def __init__(self):
        files = {"/": os.path.join(HERE, "examples", "index.html"),
                 "/stomp.umd.min.js": os.path.join(NODE_MODULES, "@stomp", "stompjs",
                                                   "bundles", "stomp.umd.min.js")}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = files.get(self.path.split("?")[0])
                if path is None:
                    self.send_error(404)
                    return
                with open(path, "rb") as f:
                    body = f.read()
                self.send_response(200)
                self.send_header("Content-Type", "text/html" if path.endswith(".html")
                                 else "text/javascript")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def page_server():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"this test needs Chromium at {CHROMIUM} (Debian's package chromium)",
                    pytrace=False)
    s = PageServer()
    yield s
    s.close()


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_the_example_page_in_headless_chromium(start_broker, page_server, tls_files, scheme):
    ws_port = free_port()
    flags = ["-ws-port", str(ws_port)]
    if scheme == "wss":
        flags += ["-tls-cert", tls_files[0], "-tls-key", tls_files[1]]
    b = start_broker(*flags)
    url = (f"http://127.0.0.1:{page_server.port}/?broker="
           f"{scheme}://127.0.0.1:{ws_port}/")
    log = node("browser.mjs", url, timeout=90)
    assert "got hello from the browser" in log, log
    assert b.client().count_msgs("jobs") == 0          # the page ACKed it


def test_the_readme_shows_exactly_the_example_page():
    """The page in README's "From a browser" is examples/index.html, the one tested above."""
    readme = open(os.path.join(HERE, "README.md")).read()
    section = readme.split("## From a browser", 1)[1]
    page = section.split("```html\n", 1)[1].split("```", 1)[0]
    with open(os.path.join(HERE, "examples", "index.html")) as f:
        assert page == f.read()
