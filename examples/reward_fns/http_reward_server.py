"""Example remote reward endpoint: ``python examples/reward_fns/http_reward_server.py 8000``, then train
with ``reward.remote_url=http://HOST:8000/``. Protocol: docs/rewards.md."""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def reward(prompt: str, response: str, sample: dict) -> float:
    answer = str(sample.get("answer", "")).strip()
    return 1.0 if answer and answer in response else 0.0


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        batch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        rewards = [reward(*t) for t in zip(batch["prompts"], batch["responses"], batch["samples"])]
        body = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if __name__ == "__main__":
    ThreadingHTTPServer(("", int(sys.argv[1])), Handler).serve_forever()
