"""Upload the committed dashboards to a running Grafana through its HTTP API (grafana-client).

File provisioning (deploy/grafana/) suits a Grafana you deploy; this suits one you only have a
token for. Uploads overwrite by uid, so pushing again is an update, never a duplicate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import niquests
from grafana_client import GrafanaApi
from grafana_client.client import GrafanaException, GrafanaUnauthorizedError

from . import JSON_DIR


class PushError(Exception):
    """One line that says what failed and where: the CLI prints it as is."""


def load(directory: Path = JSON_DIR) -> list[dict]:
    dashboards = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(directory.glob("*.json"))]
    if not dashboards:
        raise PushError(f"no dashboard JSON in {directory} (run `gradwatch dashboards export`)")
    return dashboards


def _folder_uid(api: GrafanaApi, title: str) -> str:
    for folder in api.folder.get_all_folders():
        if folder.get("title") == title:
            return folder["uid"]
    return api.folder.create_folder(title)["uid"]


def push(grafana_url: str, token: str, folder: str = "gradwatch", dashboards: Optional[list[dict]] = None,
         timeout: float = 10) -> list[str]:
    """Create `folder` if missing, upload every dashboard into it; returns the uploaded dashboards' URLs."""
    dashboards = load() if dashboards is None else dashboards
    api = GrafanaApi.from_url(grafana_url, credential=token, timeout=timeout)
    try:
        folder_uid = _folder_uid(api, folder)
        urls = []
        for d in dashboards:
            reply = api.dashboard.update_dashboard(
                {"dashboard": {**d, "id": None}, "folderUid": folder_uid, "overwrite": True,
                 "message": "gradwatch dashboards push"}
            )
            urls.append(grafana_url.rstrip("/") + reply.get("url", f"/d/{d['uid']}"))
        return urls
    except GrafanaUnauthorizedError:
        raise PushError(f"Grafana at {grafana_url} rejected the token (401 Unauthorized)") from None
    except GrafanaException as exc:
        status = f" (HTTP {exc.status_code})" if exc.status_code else ""
        raise PushError(f"Grafana at {grafana_url} failed{status}: {_one_line(exc.message)}") from None
    except niquests.exceptions.RequestException as exc:
        raise PushError(f"Grafana unreachable at {grafana_url}: {_one_line(str(exc))}") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]
