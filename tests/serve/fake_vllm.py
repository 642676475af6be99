"""A stand-in for vLLM's python in tests of `clex serve`: `-c CODE` answers the probe as a python with vLLM 0.32
and clex's plugin would; `-m MODULE ...` serves /health on --port, copies what it was given into $FAKE_VLLM_OUT,
and exits 0 on SIGTERM (recording it)."""

import http.server
import json
import os
import shutil
import signal
import sys
from pathlib import Path

if sys.argv[1] == "-c":
    print(json.dumps({"vllm": os.environ.get("FAKE_VLLM_VERSION", "0.32.0"), "clex": "0.1.0", "plugin": ["x"]}))
    sys.exit(0)
args, out = sys.argv[3:], Path(os.environ["FAKE_VLLM_OUT"])
port = int(args[args.index("--port") + 1])
shutil.copytree(args[args.index("--hf-config-path") + 1], out / "hf-config")
(out / "argv.json").write_text(json.dumps(sys.argv[1:]))
(out / "env.json").write_text(json.dumps({k: os.environ.get(k) for k in ("VLLM_USE_V2_MODEL_RUNNER", "VLLM_PLUGINS")}))


def stop(signum, frame):
    (out / "sigterm").write_text("1")
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
