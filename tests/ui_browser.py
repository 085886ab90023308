#!/usr/bin/env python3
"""The page at / in a real browser: headless Chromium driven by Selenium, run by tests/ui.rs.

Usage: ui_browser.py OPEN_URL KEYED_URL KEY SCREENSHOT
  OPEN_URL   a server without API keys, serving an embedding model first and a reranker
  KEYED_URL  a server with --api-key KEY and --no-truncate
Exit 0 when every check passed, 1 when one failed, 77 when the browser cannot start here (the reason is
printed after "SKIPPED: ").
"""

import base64
import http.server
import json
import shutil
import sys
import tempfile
import threading
import urllib.request
from urllib.parse import urlsplit

SKIP = 77
PAGE_LIMIT = 40 * 1024


def skip(reason):
    print(f"SKIPPED: {reason}")
    sys.exit(SKIP)


try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as e:
    skip(f"selenium cannot be imported: {e}")

# Watches the page from before its first script: policy violations and how often the key dialog opens.
# Scripts added this way run outside the page's Content-Security-Policy.
WATCH = """
window.__violations = [];
document.addEventListener('securitypolicyviolation',
  (e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI + ' ' + (e.sample || '')));
window.__keyDialogs = 0;
const showModal = HTMLDialogElement.prototype.showModal;
HTMLDialogElement.prototype.showModal = function () { window.__keyDialogs++; return showModal.call(this); };
"""


def start_browser(profile):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        skip("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"]:
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    try:
        browser = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    except Exception as e:  # noqa: BLE001 - any failure to start is "cannot start here"
        skip(f"Chromium cannot start: {str(e).strip().splitlines()[0]}")
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH})
    return browser


def api(base, path, body=None, key=None):
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(base + path, data=data, headers=headers)) as r:
        return json.load(r)


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5


def wait(browser, what, condition, seconds=60):
    try:
        return WebDriverWait(browser, seconds, poll_frequency=0.1).until(lambda _: condition())
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; page text:\n{browser.find_element(By.TAG_NAME, 'body').text}")


def cards(browser):
    return [c.get_attribute("data-model") for c in browser.find_elements(By.CSS_SELECTOR, "#cards .card")]


def set_texts(browser, texts):
    """Leaves exactly len(texts) text boxes in the Similarity section, holding `texts`."""
    while len(browser.find_elements(By.CSS_SELECTOR, "#sim-texts textarea")) > max(2, len(texts)):
        browser.find_elements(By.CSS_SELECTOR, "#sim-texts button.remove")[-1].click()
    while len(browser.find_elements(By.CSS_SELECTOR, "#sim-texts textarea")) < len(texts):
        browser.find_element(By.ID, "sim-add").click()
    for area, text in zip(browser.find_elements(By.CSS_SELECTOR, "#sim-texts textarea"), texts):
        area.clear()
        area.send_keys(text)


def compare(browser):
    """Clicks Compare and waits for the new result (a table or an error)."""
    browser.execute_script("document.getElementById('sim-out').replaceChildren()")
    browser.find_element(By.ID, "sim-run").click()
    wait(browser, "the similarity result",
         lambda: browser.find_elements(By.CSS_SELECTOR, "#sim-out table, #sim-out .error"))


def enter_key(browser, key):
    wait(browser, "the key dialog", lambda: browser.find_element(By.ID, "key-dialog").get_attribute("open") is not None)
    field = browser.find_element(By.ID, "key-input")
    field.clear()
    field.send_keys(key, Keys.ENTER)


def check_models_and_cosine(browser, base, key=None):
    models = api(base, "/v1/models", key=key)["data"]
    wait(browser, "the model cards", lambda: len(cards(browser)) == len(models))
    assert cards(browser) == models, f"the page lists {cards(browser)}, the server {models}"
    model = browser.find_element(By.ID, "sim-model").get_attribute("value")
    assert model == models[0], model

    texts = ["The weather is lovely today.", "It is sunny and warm outside."]
    set_texts(browser, texts)
    compare(browser)
    expected = api(base, "/v1/embeddings", {"model": model, "input": texts}, key)["data"]
    value = cosine(expected[0]["embedding"], expected[1]["embedding"])
    for cell in ["sim-0-1", "sim-1-0"]:
        shown = browser.find_element(By.ID, cell).text
        assert shown == f"{value:.4f}", f"{cell} shows {shown}; /v1/embeddings gives {value:.6f}"
    assert browser.find_element(By.ID, "sim-0-0").text == "1.0000"
    for i, text in enumerate(texts):
        tokens = api(base, "/v1/embeddings", {"model": model, "input": [text]}, key)["usage"]["prompt_tokens"]
        shown = browser.find_element(By.ID, f"sim-tokens-{i}").text
        assert shown == str(tokens), f"text {i}: the page shows {shown} tokens, the server counts {tokens}"
    print(f"  cosine shown {value:.4f} = /v1/embeddings; token counts match")
    return models


def show_tokens(browser, text):
    """Asks the Tokens section for `text`'s tokens and waits for them (or an error)."""
    area = browser.find_element(By.ID, "tok-text")
    area.clear()
    area.send_keys(text)
    browser.execute_script("document.getElementById('tok-out').replaceChildren()")
    browser.find_element(By.ID, "tok-run").click()
    wait(browser, "the tokens", lambda: browser.find_elements(By.CSS_SELECTOR, "#tok-out .tokview, #tok-out .error"))
    errors = browser.find_elements(By.CSS_SELECTOR, "#tok-out .error")
    assert not errors, errors[0].text


def check_sections(browser, base, key=None, require_rerank=False):
    """Tokens and Rerank appear exactly when the server has them; where they do, they show the server's answer."""
    paths = api(base, "/openapi.json", key=key)["paths"]
    cards_json = [api(base, f"/v1/models/{m}", key=key) for m in api(base, "/v1/models", key=key)["data"]]
    tokens_shown = browser.find_element(By.ID, "tokens").is_displayed()
    assert tokens_shown == ("/tokenize" in paths), f"Tokens shown: {tokens_shown}"
    if tokens_shown:
        text = "Tokenizers split naïve words: ünïcode too."
        show_tokens(browser, text)
        model = browser.find_element(By.ID, "tok-model").get_attribute("value")
        expected = api(base, "/tokenize", {"model": model, "inputs": text}, key)[0]
        ids = browser.find_element(By.CSS_SELECTOR, "#tok-out .ids").text.split()
        assert ids == [str(t["id"]) for t in expected], ids
        # Laid over the text: the ordinary tokens and the gaps between them give the text back.
        overlay = browser.execute_script(
            "const v = document.querySelector('#tok-out .tokview').cloneNode(true);"
            "v.querySelectorAll('.special').forEach((s) => s.remove()); return v.textContent;")
        assert overlay == text, f"the overlay reads {overlay!r}"
        print(f"  tokens: {len(ids)} ids as /tokenize gives them, laid over the text")
    rerankers = [c for c in cards_json if c.get("task") == "rerank"]
    rerank_shown = browser.find_element(By.ID, "rerank").is_displayed()
    assert rerank_shown == ("/v1/rerank" in paths and bool(rerankers)), f"Rerank shown: {rerank_shown}"
    if require_rerank:
        assert rerankers and rerank_shown, f"this server must serve a reranker: {cards_json}"
    if rerank_shown:
        check_rerank(browser, base, rerankers[-1]["id"], key)
    links = [a.get_attribute("pathname") for a in browser.find_elements(By.CSS_SELECTOR, "#link-list a")]
    assert links == ["/openapi.json", "/metrics", "/health"], links


def check_rerank(browser, base, model, key=None):
    """Fills the Rerank section with a query and three documents: the page shows /v1/rerank's scores, to 4
    decimals, in /v1/rerank's order."""
    query = "How do I keep my laptop battery healthy?"
    documents = ["The Eiffel Tower is in Paris.",
                 "Lithium-ion cells wear faster when hot; keep the laptop cool.",
                 "Avoid keeping the battery at 100% charge for long periods."]
    browser.find_element(By.CSS_SELECTOR, f'#rr-model option[value="{model}"]').click()
    field = browser.find_element(By.ID, "rr-query")
    field.clear()
    field.send_keys(query)
    area = browser.find_element(By.ID, "rr-docs")
    area.clear()
    area.send_keys("\n".join(documents))
    browser.execute_script("document.getElementById('rr-out').replaceChildren()")
    browser.find_element(By.ID, "rr-run").click()
    wait(browser, "the ranking", lambda: browser.find_elements(By.CSS_SELECTOR, "#rr-out li, #rr-out .error"))
    assert not browser.find_elements(By.CSS_SELECTOR, "#rr-out .error"), browser.find_element(By.ID, "rr-out").text
    shown = [(li.find_element(By.CSS_SELECTOR, ".score").text, li.text) for li in
             browser.find_elements(By.CSS_SELECTOR, "#rr-out li")]
    results = api(base, "/v1/rerank", {"model": model, "query": query, "documents": documents}, key)["results"]
    expected = [(f"{r['relevance_score']:.4f}", documents[r["index"]]) for r in results]
    assert len(shown) == len(documents) == len(expected), f"the page ranks {shown}; /v1/rerank gives {expected}"
    for (score, line), (want_score, want_document) in zip(shown, expected):
        assert score == want_score and line.endswith(want_document), \
            f"the page ranks {shown}; /v1/rerank gives {expected}"
    print(f"  rerank with {model}: {', '.join(s for s, _ in shown)} as /v1/rerank ranks and scores them")


def check_origin_and_policy(browser, base):
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(base))
    entries = browser.execute_script(
        "return performance.getEntries().filter((e) => e.name.includes(':'))"
        ".map((e) => ({name: e.name, type: e.entryType, size: e.decodedBodySize}))")
    foreign = [e["name"] for e in entries if not e["name"].startswith(origin + "/")]
    assert not foreign, f"requests to another origin: {foreign}"
    page = [e for e in entries if e["type"] == "navigation"]
    assert len(page) == 1 and 0 < page[0]["size"] <= PAGE_LIMIT, f"the page's size: {page}"
    # Every request the page made, including any the policy blocked (which performance entries omit).
    sent = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
    urls = {m["params"]["request"]["url"] for m in sent if m["method"] == "Network.requestWillBeSent"
            and m["params"].get("documentURL", "").startswith(origin + "/")}
    assert origin + "/" in urls, f"the page's own requests are not in the log: {urls}"
    stray = [u for u in urls if not u.startswith(origin + "/") and not u.startswith("data:")]
    assert not stray, f"the browser asked for {stray}"
    violations = browser.execute_script("return window.__violations")
    assert violations == [], f"Content-Security-Policy violations: {violations}"
    logged = [entry["message"] for entry in browser.get_log("browser") if "Content Security Policy" in entry["message"]]
    assert not logged, f"the console reports: {logged}"
    print(f"  {len(entries)} requests, all to {origin}; the page is {page[0]['size']} bytes; no policy violation")


def check_the_check_sees_violations(browser):
    """An inline script the policy does not list is refused and reported: the checks above can fail."""
    browser.execute_script("const s = document.createElement('script'); s.textContent = 'window.__ran = 1';"
                           "document.body.append(s);")
    wait(browser, "the violation report", lambda: browser.execute_script("return window.__violations.length") > 0, 10)
    assert browser.execute_script("return window.__ran") is None, "an unlisted inline script ran"
    logged = [entry["message"] for entry in browser.get_log("browser")]
    assert any("Content Security Policy" in m for m in logged), f"the console did not report it: {logged}"


# ---- fields and endpoints this server does not have yet ---------------------------------------------------

FUTURE_CARDS = {
    "embedder": {"id": "embedder", "object": "model", "dims": 8, "max_tokens": 512, "pooling": "mean",
                 "precision": "bf16", "task": "embed", "normalized": True, "default_prompt_name": "document",
                 "prompts": {"query": "search_query: ", "document": "search_document: "},
                 "encoding_formats": ["float", "base64", "int8"], "source": "directory", "directory": "/srv/embedder"},
    "reranker": {"id": "reranker", "object": "model", "max_tokens": 512, "precision": "f32", "task": "rerank"},
}


def tei_tokens(text):
    """/tokenize's documented shape for `text`: words split at spaces, the longer ones in two pieces,
    byte offsets, and [CLS]/[SEP] as special tokens without offsets."""
    tokens = [{"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}]
    at = 0
    for word in text.split(" "):
        data = word.encode()
        cuts = [0, len(data)] if len(word) < 5 else [0, len(word[:3].encode()), len(data)]
        for a, b in zip(cuts, cuts[1:]):
            tokens.append({"id": 1000 + len(tokens), "text": data[a:b].decode(), "special": False,
                           "start": at + a, "stop": at + b})
        at += len(data) + 1
    tokens.append({"id": 102, "text": "[SEP]", "special": True, "start": None, "stop": None})
    return tokens


def stand_in(open_url):
    """A stand-in server on another port: the real page with its real policy, and the API answering in the
    shapes other branches are adding (model cards with precision, pooling, task and prompts; /tokenize;
    /v1/rerank), so that the page's handling of them is checked before the real ones exist."""
    with urllib.request.urlopen(open_url + "/") as r:
        page, policy = r.read(), r.headers["Content-Security-Policy"]
    document = api(open_url, "/openapi.json")
    document["paths"]["/tokenize"] = {"post": {}}
    document["paths"]["/v1/rerank"] = {"post": {}}
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self, body, content_type="application/json", headers=()):
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/":
                return self.answer(page, "text/html; charset=utf-8", [("Content-Security-Policy", policy)])
            if self.path.startswith("/v1/models/"):
                return self.answer(FUTURE_CARDS[self.path.rsplit("/", 1)[1]])
            self.answer({"/openapi.json": document,
                         "/v1/info": {"name": "embedding-server", "version": "9.9.9", "started": 0,
                                      "uptime_seconds": 90061},
                         "/v1/models": {"object": "list", "data": list(FUTURE_CARDS)}}[self.path])

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append((self.path, body))
            if self.path == "/v1/embeddings":
                text = body["input"][0]
                vector = [len(text), text.count("a"), 1.0] + [0.0] * 5
                self.answer({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vector}],
                             "usage": {"prompt_tokens": len(text.split()) + 2, "total_tokens": 0}})
            elif self.path == "/tokenize":
                self.answer([tei_tokens(body["inputs"])])
            else:
                scores = [0.1, 0.9, 0.5][: len(body["documents"])]
                self.answer({"results": [{"index": i, "relevance_score": s} for i, s in enumerate(scores)]})

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


def capture(browser, path):
    """The whole page, not just the window, as PNG."""
    shot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))


def check_future_shapes(browser, open_url, screenshot):
    server, received = stand_in(open_url)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        browser.get(base + "/")
        wait(browser, "the model cards", lambda: cards(browser) == list(FUTURE_CARDS))
        assert browser.find_element(By.ID, "version").text == "9.9.9"
        assert browser.find_element(By.ID, "uptime").text.startswith("1 d 1 h"), browser.find_element(By.ID, "uptime").text

        def fields(model):
            card = browser.find_element(By.CSS_SELECTOR, f'.card[data-model="{model}"]')
            names = [dt.text for dt in card.find_elements(By.TAG_NAME, "dt")]
            return dict(zip(names, [dd.text for dd in card.find_elements(By.TAG_NAME, "dd")]))
        embedder, reranker = fields("embedder"), fields("reranker")
        for name, value in [("dims", "8"), ("max tokens", "512"), ("pooling", "mean"), ("precision", "bf16"),
                            ("task", "embed"), ("normalized", "yes"), ("formats", "float, base64, int8"),
                            ("source", "/srv/embedder")]:
            assert embedder.get(name) == value, f"{name}: {embedder}"
        assert "query" in embedder["prompts"] and "search_document: " in embedder["prompts"], embedder
        assert set(reranker) == {"max tokens", "precision", "task"}, f"absent fields are omitted: {reranker}"

        # Similarity: embedding models only, with their prompts; the chosen prompt is sent.
        options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#sim-model option")]
        assert options == ["embedder"], options
        prompts = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#sim-prompt option")]
        assert prompts == ["", "query", "document"], prompts
        browser.find_element(By.CSS_SELECTOR, '#sim-prompt option[value="query"]').click()
        set_texts(browser, ["a banana", "an apple"])
        compare(browser)
        sent = [body for path, body in received if path == "/v1/embeddings"]
        assert [b.get("prompt_name") for b in sent] == ["query", "query"], sent
        assert browser.find_element(By.ID, "sim-tokens-0").text == "4", "the count from each text's own usage"

        # Tokens laid over the text, special tokens as marks of their own.
        text = "Tokens over naïve text"
        show_tokens(browser, text)
        view = browser.find_element(By.CSS_SELECTOR, "#tok-out .tokview")
        specials = [e.text for e in view.find_elements(By.CSS_SELECTOR, ".special")]
        pieces = [e.text for e in view.find_elements(By.CSS_SELECTOR, "span:not(.special)")]
        assert specials == ["[CLS]", "[SEP]"], specials
        expected = [t["text"] for t in tei_tokens(text) if not t["special"]]
        assert pieces == expected, f"{pieces} != {expected}"

        # Rerank: only the reranker, results best first.
        assert [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#rr-model option")] == ["reranker"]
        browser.find_element(By.ID, "rr-run").click()
        wait(browser, "the ranking", lambda: browser.find_elements(By.CSS_SELECTOR, "#rr-out li"))
        ranked = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#rr-out li")]
        assert ranked[0].startswith("0.9000") and "Eiffel" in ranked[0], ranked
        assert ranked[-1].startswith("0.1000"), ranked
        rerank = [body for path, body in received if path == "/v1/rerank"][0]
        assert rerank["model"] == "reranker" and len(rerank["documents"]) == 3, rerank
        check_origin_and_policy(browser, base)
        capture(browser, screenshot)
        print(f"  stand-in with the coming shapes: card fields shown or omitted, prompts, tokens, rerank ({screenshot})")
    finally:
        server.shutdown()


def main():
    open_url, keyed_url, key, screenshot = sys.argv[1:5]
    profile = tempfile.mkdtemp(prefix="embedding-server-chromium-")
    browser = start_browser(profile)
    try:
        print(f"{browser.capabilities.get('browserVersion', '?')} on {open_url}")
        browser.get(open_url + "/")
        check_models_and_cosine(browser, open_url)
        check_sections(browser, open_url, require_rerank=True)

        # The screenshot for the README: four texts compared.
        set_texts(browser, ["A cat is sleeping on the sofa.", "A kitten naps on the couch.",
                            "The stock market fell sharply today.", "Shares dropped at the opening bell."])
        compare(browser)
        capture(browser, screenshot)
        check_origin_and_policy(browser, open_url)
        check_the_check_sees_violations(browser)
        check_future_shapes(browser, open_url, screenshot.removesuffix(".png") + "-stand-in.png")

        print(f"with an API key on {keyed_url}")
        browser.get(keyed_url + "/")
        enter_key(browser, "not-the-key")
        wait(browser, "the refusal", lambda: "refused" in browser.find_element(By.ID, "key-why").text)
        enter_key(browser, key)
        check_models_and_cosine(browser, keyed_url, key)
        assert browser.execute_script("return window.__keyDialogs") == 2, "asked for the key once, and once after a wrong one"
        storage = browser.execute_script(
            "return [sessionStorage.getItem('embedding-server.api-key'), localStorage.length, document.cookie]")
        assert storage == [key, 0, ""], f"the key is kept in sessionStorage only: {storage}"

        browser.refresh()
        check_models_and_cosine(browser, keyed_url, key)
        assert browser.execute_script("return window.__keyDialogs") == 0, "asked again after a reload"

        # Forgotten: the two requests of a comparison both get 401, and the key is asked for once.
        browser.find_element(By.ID, "forget").click()
        browser.execute_script("document.getElementById('sim-out').replaceChildren()")
        browser.find_element(By.ID, "sim-run").click()
        enter_key(browser, key)
        wait(browser, "the similarity result", lambda: browser.find_elements(By.CSS_SELECTOR, "#sim-out table"))
        assert browser.execute_script("return window.__keyDialogs") == 1, "one dialog for two refused requests"

        # An error from the API: its message in plain words, and its body as it came.
        set_texts(browser, ["word " * 400, "short"])
        compare(browser)
        error = browser.find_element(By.CSS_SELECTOR, "#sim-out .error")
        assert "400" in error.text and "tokens" in error.text, error.text
        body = error.find_element(By.TAG_NAME, "pre").text
        assert json.loads(body)["error"]["type"] == "invalid_request_error", body
        print(f"  key asked for once per need, kept in sessionStorage; error shown: {error.text.splitlines()[0][:100]}")
        check_origin_and_policy(browser, keyed_url)
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"screenshot: {screenshot}")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAILED: {e}")
        sys.exit(1)
