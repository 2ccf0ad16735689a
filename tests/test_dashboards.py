"""The Grafana dashboards (gradwatch.dashboards): the committed JSON is what the code generates, the
JSON is well formed for Grafana, `push` speaks Grafana's HTTP API, and every query a panel, variable or
annotation runs parses and returns data from a real Prometheus that scraped a real training run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from conftest import free_port
from gradwatch.cli import main as cli
from gradwatch.dashboards import JSON_DIR
from gradwatch.dashboards import export as dashboards_export
from promtool_cases import require
from servers import http_json, prometheus, wait_for

COMMITTED = {p.name: json.loads(p.read_text()) for p in sorted(JSON_DIR.glob("*.json"))}


def panels(d: dict) -> list[dict]:
    return d.get("panels", [])


def targets(d: dict) -> Iterator[tuple[str, dict]]:
    """(where, query) for every panel target, template-variable query and annotation of a dashboard."""
    for p in panels(d):
        for t in p.get("targets", []):
            yield f"{d['uid']} / {p['title']} [{t.get('refId')}]", t
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            yield f"{d['uid']} / variable ${v['name']}", v
    for a in d["annotations"].get("list", []):
        yield f"{d['uid']} / annotation {a['name']}", a


def expression(q: dict) -> str:
    return q["expr"] if "expr" in q else q["query"]


# --- the committed JSON is the generated JSON -----------------------------------------------------

def test_committed_json_equals_generated() -> None:
    fresh = dashboards_export.render()
    assert sorted(fresh) == sorted(COMMITTED), "dashboards/json/ holds other files than the generator writes"
    for name, text in fresh.items():
        assert (JSON_DIR / name).read_text() == text, f"{name} is stale: run `gradwatch dashboards export`"


def test_export_check_flags_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli(["dashboards", "export", "-o", str(tmp_path)]) == 0
    assert cli(["dashboards", "export", "-o", str(tmp_path), "--check"]) == 0
    path = tmp_path / "gradwatch-ranks.json"
    path.write_text(path.read_text().replace("Loss per rank", "Loss by rank"))
    capsys.readouterr()
    assert cli(["dashboards", "export", "-o", str(tmp_path), "--check"]) == 1
    assert "gradwatch-ranks.json" in capsys.readouterr().err


REPO = Path(__file__).resolve().parents[1]


def test_export_defaults_to_the_checkouts_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """From a checkout's root, `export` and `--check` use ./dashboards/json - never the installed package's
    json/, which a non-editable install puts in site-packages."""
    monkeypatch.chdir(REPO)
    assert cli(["dashboards", "export", "--check"]) == 0
    assert capsys.readouterr().out.startswith("dashboards/json: up to date")
    checkout = tmp_path / "checkout"
    (checkout / "dashboards").mkdir(parents=True)
    (checkout / "dashboards" / "export.py").write_text("")
    monkeypatch.chdir(checkout)
    before = {p.name: p.stat().st_mtime_ns for p in JSON_DIR.glob("*.json")}
    assert cli(["dashboards", "export", "--check"]) == 1  # nothing there yet
    assert cli(["dashboards", "export"]) == 0
    assert sorted(p.name for p in (checkout / "dashboards" / "json").iterdir()) == sorted(COMMITTED)
    assert cli(["dashboards", "export", "--check"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in JSON_DIR.glob("*.json")} == before


def test_export_outside_a_checkout_needs_an_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "dashboards" / "json").mkdir(parents=True)  # a directory of that name is not a checkout
    monkeypatch.chdir(tmp_path)
    for args in (["dashboards", "export"], ["dashboards", "export", "--check"]):
        capsys.readouterr()
        assert cli(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not in a gradwatch checkout" in err and "-o DIR" in err, err
    assert not any((tmp_path / "dashboards" / "json").iterdir())


def test_cli_works_without_the_grafana_libraries() -> None:
    """The aggregator's CLI registers `dashboards`: it must import without either library, and using
    the sub-command then names the extra to install."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'grafana_foundation_sdk', 'grafana_client'}: raise ImportError(name, name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from gradwatch.cli import main\n"
        "sys.exit(main(['dashboards', 'export', '--check', '-o', '.']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "pip install 'gradwatch[dashboards]'" in result.stderr and result.stderr.count("\n") == 1


# --- schema checks ----------------------------------------------------------------------------------

def test_four_dashboards_with_stable_unique_uids() -> None:
    uids = [d["uid"] for d in COMMITTED.values()]
    assert sorted(uids) == ["gradwatch-activations", "gradwatch-layers", "gradwatch-overview", "gradwatch-ranks"]
    assert all(f"{d['uid']}.json" == name for name, d in COMMITTED.items())


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_panel_ids_unique_and_grid_fits_without_overlap(name: str) -> None:
    ps = panels(COMMITTED[name])
    ids = [p["id"] for p in ps]
    assert len(ids) == len(set(ids)), f"duplicate panel ids {ids}"
    cells: dict[tuple[int, int], str] = {}
    for p in ps:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and g["x"] >= 0 and g["y"] >= 0 and g["x"] + g["w"] <= 24, (p["title"], g)
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r} at {(x, y)}"
                cells[(x, y)] = p["title"]


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_every_query_uses_the_datasource_variable(name: str) -> None:
    d = COMMITTED[name]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${datasource}"}
    for p in panels(d):
        assert p["datasource"] == ref, p["title"]
    for where, q in targets(d):
        assert q["datasource"] == ref, where


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_every_variable_used_is_defined_and_layer_rank_are_regex_matched(name: str) -> None:
    d = COMMITTED[name]
    defined = {v["name"] for v in d["templating"]["list"]}
    builtin = {"__rate_interval", "__interval", "__range"}
    for where, q in targets(d):
        expr = expression(q)
        used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", expr))  # not label_replace's $1, ${1}
        assert used <= defined | builtin, f"{where}: undefined {used - defined - builtin} in {expr}"
        # Multi-value variables expand to a|b regexes (All to .*): an `=` matcher would match nothing.
        for var in ("layer", "rank"):
            for m in re.finditer(rf'(\w+)\s*(=~|!~|=|!=)\s*"\${var}"', expr):
                assert m.group(2) == "=~" and m.group(1) == var, f"{where}: {m.group(0)}"
    for v in d["templating"]["list"]:
        if v["name"] in ("layer", "rank"):
            assert v["multi"] and v["includeAll"] and v["allValue"] == ".*"


@pytest.mark.parametrize("name", sorted(COMMITTED))
def test_every_panel_has_a_unit(name: str) -> None:
    for p in panels(COMMITTED[name]):
        assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']!r} has no unit"


EXPECTED = {
    # The issue's panels, by title substring, with their unit; and each dashboard's variables.
    "gradwatch-overview": ({"Loss": "short", "Global gradient norm": "short", "Learning rate": "sci",
                            "Skipped and clipped steps": "none", "Active alerts": "none", "Commands applied": "none"},
                           {"datasource", "job"}),
    "gradwatch-layers": ({"Gradient norm per layer": "short", "Weight norm": "short", "Update ratio": "percentunit",
                          "Vanishing layers": "percentunit"}, {"datasource", "job", "layer"}),
    "gradwatch-activations": ({"Saturated fraction": "percentunit", "Dead-unit fraction": "percentunit"},
                              {"datasource", "job", "layer"}),
    "gradwatch-ranks": ({"Loss per rank": "short", "Non-finite items per rank": "none", "Step time per rank": "s",
                         "Progress per rank": "short", "Seconds without progress / heartbeat age": "s"},
                        {"datasource", "job", "rank"}),
}


def test_the_panels_the_issue_names_exist() -> None:
    by_uid = {d["uid"]: d for d in COMMITTED.values()}
    for uid, (wanted, variables) in EXPECTED.items():
        d = by_uid[uid]
        assert {v["name"] for v in d["templating"]["list"]} == variables, uid
        for title, unit in wanted.items():
            found = [p for p in panels(d) if title in p["title"]]
            assert found, f"{uid}: no panel {title!r}"
            assert found[0]["fieldConfig"]["defaults"]["unit"] == unit, (uid, title)
    overview = by_uid["gradwatch-overview"]
    loss = next(p for p in panels(overview) if p["title"] == "Loss")
    assert {t["expr"] for t in loss["targets"]} >= {'gradwatch_loss{job="$job"}', 'gradwatch_loss_max{job="$job"}'}
    norm = next(p for p in panels(overview) if p["title"] == "Global gradient norm")
    assert any("gradwatch_guard_clip_bound" in t["expr"] for t in norm["targets"])
    assert any("gradwatch_commands_applied_total" in a["expr"] for a in overview["annotations"]["list"])
    heat = next(p for p in panels(by_uid["gradwatch-layers"]) if p["title"] == "Gradient norm per layer")
    assert heat["type"] == "heatmap" and "gradwatch_layer_grad_norm" in heat["targets"][0]["expr"]


# --- the layer heatmap's row order -----------------------------------------------------------------

# Shuffled, as a model's parameters might be exported; natural order is the network's order here.
LAYERS = ["layers.10.mlp.weight", "embed.weight", "layers.2.mlp.weight", "layers.0.mlp.weight", "layers.100.mlp.weight",
          "layers.11.mlp.weight", "layers.1.mlp.weight", "layers.20.mlp.weight", "norm.weight", "fc10.weight", "fc2.weight"]
NATURAL = ["embed.weight", "fc2.weight", "fc10.weight", "layers.0.mlp.weight", "layers.1.mlp.weight", "layers.2.mlp.weight",
           "layers.10.mlp.weight", "layers.11.mlp.weight", "layers.20.mlp.weight", "layers.100.mlp.weight", "norm.weight"]


def test_heatmap_rows_come_in_natural_layer_order(tmp_path: Path) -> None:
    """Grafana draws a heatmap's rows in the order of the query's series (it sorts only all-numeric
    names). A real Prometheus scrapes those layers: the heatmap's query returns them in natural order
    (layers.2 before layers.10), where the bare selector's order is Prometheus's lexical one."""
    body = "".join(f'gradwatch_layer_grad_norm{{job="order",layer="{name}"}} {i}\n' for i, name in enumerate(LAYERS)).encode()

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    prom_port = free_port()
    prom = prometheus(tmp_path, [f"127.0.0.1:{server.server_port}"], port=prom_port).start()
    try:
        heat = next(p for p in panels(COMMITTED["gradwatch-layers.json"]) if p["title"] == "Gradient norm per layer")
        assert heat["options"]["yAxis"]["reverse"] is True  # the first layer at the top

        def layers(expr: str) -> list[str]:
            end = time.time()
            params = urllib.parse.urlencode({"query": concrete(expr, "order", 60), "start": end - 30, "end": end, "step": 1})
            return [s["metric"]["layer"] for s in http_json(f"http://127.0.0.1:{prom_port}/api/v1/query_range?{params}")["data"]["result"]]

        bare = 'gradwatch_layer_grad_norm{job="$job", layer=~"$layer"}'
        assert wait_for(lambda: layers(bare) if len(layers(bare)) == len(LAYERS) else None, 30, "a scrape") == sorted(LAYERS)
        assert sorted(LAYERS) != NATURAL  # the problem: lexical order puts layers.10 before layers.2
        assert layers(heat["targets"][0]["expr"]) == NATURAL
    finally:
        prom.stop()
        server.shutdown()
        server.server_close()


# --- push: a stand-in for Grafana's HTTP API ----------------------------------------------------------

class FakeGrafana:
    """NOT Grafana (none can be installed here): a stand-in serving only the three endpoints
    `gradwatch dashboards push` calls through grafana-client - GET/POST /api/folders and POST
    /api/dashboards/db - with bearer-token checks, recording every request body."""

    def __init__(self, token: str, fail_dashboards_with: Optional[int] = None) -> None:
        self.token, self.fail = token, fail_dashboards_with
        self.folders: list[dict] = []
        self.uploads: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        grafana = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self, status: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                grafana.requests.append((self.command, self.path))
                if self.headers.get("Authorization") != f"Bearer {grafana.token}":
                    self._reply(401, {"message": "invalid API key"})
                    return False
                return True

            def do_GET(self) -> None:
                if self._authorized():
                    if urllib.parse.urlparse(self.path).path == "/api/folders":
                        self._reply(200, [{"id": i + 1, **f} for i, f in enumerate(grafana.folders)])
                    else:
                        self._reply(404, {"message": "not found"})

            def do_POST(self) -> None:
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/api/folders":
                    folder = {"uid": f"f{len(grafana.folders) + 1}", "title": body["title"]}
                    grafana.folders.append(folder)
                    self._reply(200, folder)
                elif self.path == "/api/dashboards/db":
                    if grafana.fail:
                        self._reply(grafana.fail, {"message": "database is locked"})
                        return
                    grafana.uploads.append(body)
                    uid = body["dashboard"]["uid"]
                    self._reply(200, {"status": "success", "uid": uid, "url": f"/d/{uid}/x", "version": 1})
                else:
                    self._reply(404, {"message": "not found"})

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    g = FakeGrafana("s3cret")
    yield g
    g.close()


def test_push_creates_the_folder_once_and_uploads_every_dashboard(grafana: FakeGrafana, capsys: pytest.CaptureFixture) -> None:
    args = ["dashboards", "push", "--grafana-url", grafana.url, "--token", "s3cret", "--folder", "Training health"]
    assert cli(args) == 0
    assert grafana.folders == [{"uid": "f1", "title": "Training health"}]
    assert len(grafana.uploads) == len(COMMITTED) == 4
    for upload in grafana.uploads:
        assert upload["overwrite"] is True and upload["folderUid"] == "f1"
        committed = COMMITTED[upload["dashboard"]["uid"] + ".json"]
        assert upload["dashboard"] == {**committed, "id": None}
    assert capsys.readouterr().out.split() == [f"{grafana.url}/d/{d['dashboard']['uid']}/x" for d in grafana.uploads]
    # Again: the folder is found by title, not created twice; dashboards overwrite by uid.
    assert cli(args) == 0
    assert len(grafana.folders) == 1 and len(grafana.uploads) == 8
    assert grafana.requests.count(("POST", "/api/folders")) == 1


@pytest.mark.parametrize("case", ["bad token", "server error", "unreachable"])
def test_push_fails_with_one_clear_line(case: str, capsys: pytest.CaptureFixture) -> None:
    g = FakeGrafana("s3cret", fail_dashboards_with=500 if case == "server error" else None)
    url = f"http://127.0.0.1:{free_port()}" if case == "unreachable" else g.url
    try:
        code = cli(["dashboards", "push", "--grafana-url", url, "--token", "wrong" if case == "bad token" else "s3cret"])
    finally:
        g.close()
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("gradwatch: "), err
    assert url in err
    assert {"bad token": "401", "server error": "HTTP 500", "unreachable": "unreachable"}[case] in err, err
    if case == "server error":
        assert "database is locked" in err and not g.uploads


# --- every query against a real Prometheus that scraped a real run ------------------------------------

RATE_INTERVAL = "5s"  # what Grafana's $__rate_interval would be at a 1 s scrape


def concrete(expr: str, job: str, window_s: int) -> str:
    """A panel's PromQL as Grafana would send it for one job and every layer/rank."""
    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", expr.strip())
    if m:  # a variable query: the label's values are those of the selector's series
        expr = f"count by ({m.group(2)}) ({m.group(1)})"
    for var, value in {"job": job, "layer": ".*", "rank": ".*", "__rate_interval": RATE_INTERVAL,
                       "__interval": "1s", "__range": f"{window_s}s"}.items():
        expr = expr.replace("${" + var + "}", value).replace("$" + var, value)
    assert not re.search(r"\$\{?[A-Za-z_]", expr), f"unsubstituted variable in {expr}"
    return expr


def check_queries(prometheus_url: str, job: str, start: Optional[float] = None, end: Optional[float] = None) -> dict[str, str]:
    """Run every dashboard query (panels, variables, annotations) over [start, end] (default: the last
    15 minutes) at a 1 s step. Returns {where: problem} for each query that fails to parse or returns
    no sample at all, so one run reports every broken panel."""
    end = time.time() if end is None else end
    start = end - 900 if start is None else start
    problems: dict[str, str] = {}
    for d in COMMITTED.values():
        for where, q in targets(d):
            expr = concrete(expression(q), job, int(end - start) + 1)
            params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": 1})
            try:
                reply = http_json(f"{prometheus_url}/api/v1/query_range?{params}", timeout=10)
            except Exception as exc:  # HTTPError 400: a parse error, with Prometheus's message in the body
                body = getattr(exc, "read", lambda: b"")().decode(errors="replace")
                problems[where] = f"error: {body or exc} <- {expr}"
                continue
            if not any(s["values"] for s in reply["data"]["result"]):
                problems[where] = f"empty <- {expr}"
    return problems


@dataclass
class DemoQueries:
    """What the dashboards' queries returned from the Prometheus of real `gradwatch demo` runs."""

    job: str
    problems: dict[str, str]  # queries empty (or failing) in both demo runs
    wrong_job_problems: dict[str, str]  # check_queries for a job Prometheus never saw
    variables: dict[tuple[str, str], set[str]]  # (dashboard uid, variable) -> values


DEMO_JOB = "dashboards-demo"
VARIABLES = [("gradwatch-overview", "job"), ("gradwatch-layers", "layer"), ("gradwatch-activations", "layer"), ("gradwatch-ranks", "rank")]


def variable_values(prometheus_url: str, job: str, uid: str, name: str, start: float, end: float) -> set[str]:
    v = next(v for v in COMMITTED[f"{uid}.json"]["templating"]["list"] if v["name"] == name)
    q = urllib.parse.urlencode({"query": concrete(v["query"], job, 60), "start": start, "end": end, "step": 1})
    return {s["metric"][name] for s in http_json(f"{prometheus_url}/api/v1/query_range?{q}")["data"]["result"]}


@pytest.fixture(scope="module")
def demo_queries(tmp_path_factory: pytest.TempPathFactory) -> DemoQueries:
    """Two real `gradwatch demo` runs on the full stack (the agent in guard mode, a real Prometheus
    scraping rank 0 every second with gradwatch's rules loaded, Alertmanager, the aggregator sending
    commands): exploding, then nan. The queries run while each demo's Prometheus is still up; a query
    must return data in at least one of them."""
    require("prometheus")
    from rich.console import Console

    from gradwatch.demo.run import Options, run

    out = tmp_path_factory.mktemp("dashboards-demo")
    found: dict = {}

    def demo(scenario: str, steps: int) -> dict[str, str]:
        job, started = f"{DEMO_JOB}-{scenario}", time.time()

        def query(stack, log) -> None:
            end = time.time()
            found[scenario] = check_queries(stack.prometheus_url, job, started, end)
            if scenario == "exploding":
                found["wrong"] = check_queries(stack.prometheus_url, "no-such-job", started, end)
                found["variables"] = {(uid, name): variable_values(stack.prometheus_url, job, uid, name, started, end) for uid, name in VARIABLES}

        summary = run(Options(scenario=scenario, stack="full", steps=steps, out=out / scenario, job=job),
                      Console(file=open(out / f"{scenario}.txt", "w")), before_teardown=query)
        assert summary.exit_code == 0 and summary.alerts, summary.model_dump_json(indent=1)
        return found[scenario]

    # exploding: alerts, commands, guard clipping, no NaN (the loop prevents it); nan: a NaN origin.
    exploding, nan = demo("exploding", 40), demo("nan", 30)
    problems = {where: f"{problem} (and in the nan run: {nan[where]})" for where, problem in exploding.items() if where in nan}
    return DemoQueries(f"{DEMO_JOB}-exploding", problems, found["wrong"], found["variables"])


@pytest.mark.multiproc
def test_every_query_parses_and_returns_data(demo_queries: DemoQueries) -> None:
    problems = demo_queries.problems
    errors = {w: p for w, p in problems.items() if p.startswith("error")}
    assert not errors, "queries Prometheus rejects:\n" + "\n".join(f"{w}: {p}" for w, p in errors.items())
    assert not problems, "empty queries:\n" + "\n".join(f"{w}: {p}" for w, p in problems.items())


@pytest.mark.multiproc
def test_check_queries_reports_a_wrong_job(demo_queries: DemoQueries) -> None:
    """check_queries itself can fail: for a job Prometheus never saw, every query scoped by $job is empty."""
    every = {w for d in COMMITTED.values() for w, _ in targets(d)}
    assert set(demo_queries.wrong_job_problems) == every - {f"{d['uid']} / variable $job" for d in COMMITTED.values()}


@pytest.mark.multiproc
def test_variables_list_the_runs_layers_modules_and_ranks(demo_queries: DemoQueries) -> None:
    values = demo_queries.variables
    assert values[("gradwatch-overview", "job")] >= {demo_queries.job}
    assert values[("gradwatch-layers", "layer")] == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert values[("gradwatch-activations", "layer")] == {"fc1", "act", "fc2"}
    assert values[("gradwatch-ranks", "rank")] == {"0", "1"}
