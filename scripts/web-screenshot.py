#!/usr/bin/env python3
"""Drive the demo page in headless Chromium through chromedriver (plain WebDriver over
HTTP, no client library): open index.html?auto=1, wait until it has answered, check the
answer, save a screenshot. Usage: web-screenshot.py SITE_URL OUT_PNG [TIMEOUT_S]"""
import base64, json, os, subprocess, sys, time, urllib.request, socket

site, out = sys.argv[1], sys.argv[2]
timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 600


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


port = free_port()
driver = subprocess.Popen([os.environ.get("CHROMEDRIVER", "chromedriver"), f"--port={port}"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
base = f"http://127.0.0.1:{port}"


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read() or b"{}").get("value")


try:
    for _ in range(100):
        try:
            call("GET", "/status")
            break
        except OSError:
            time.sleep(0.1)
    caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
        "binary": os.environ.get("CHROMIUM", "/usr/bin/chromium"),
        "args": ["--headless=new", "--enable-unsafe-webgpu", "--disable-gpu-sandbox",
                 "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"]}}}}
    sid = call("POST", "/session", caps)["sessionId"]
    s = f"/session/{sid}"
    try:
        call("POST", s + "/timeouts", {"script": 120000, "pageLoad": 120000})
        call("POST", s + "/url", {"url": site.rstrip("/") + "/index.html?auto=1"})
        t0, state = time.time(), None
        while time.time() - t0 < timeout:
            state = call("POST", s + "/execute/sync",
                         {"script": "return document.body.dataset.state || null", "args": []})
            if state in ("done", "error"):
                break
            time.sleep(1)
        result = call("POST", s + "/execute/sync", {"script": """
            return { state: document.body.dataset.state || null,
                     status: document.getElementById('status').textContent,
                     answer: document.getElementById('answer').textContent,
                     adapter: document.getElementById('adapter').textContent,
                     result: window.kvlinkResult || null };""", "args": []})
        png = call("GET", s + "/screenshot")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "wb") as f:
            f.write(base64.b64decode(png))
        print(json.dumps(result, indent=1))
        print(f"screenshot: {out} (after {time.time() - t0:.0f} s)")
        if result["state"] != "done" or not result["answer"].strip():
            sys.exit(f"the page did not answer: {result['status']}")
    finally:
        call("DELETE", s)
finally:
    driver.terminate()
    driver.wait()
