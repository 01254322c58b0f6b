"""A local stand-in for the Hugging Face Hub that speaks the Hub's own HTTP API.

The Hub cannot be reached from our machines and has no official emulator, so the tests run
the real huggingface_hub client against this server. It answers the calls that
`list_repo_files`, `snapshot_download` and `hf_hub_download` make (huggingface_hub 2.4.0:
`hf_api.py`, `file_download.py`, `utils/_http.py`), with the Hub's headers and error codes:

- `GET /api/models/{repo}[/revision/{rev}]`: the model info JSON; its `sha` is the resolved commit.
- `GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=`: `{type, oid, size, path[, lfs]}`
  entries, paginated with `Link: <...>; rel="next"` like the Hub.
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: a file kept in git answers 200 with its git blob id
  as `ETag`, `Content-Length` and `X-Repo-Commit`; an LFS file answers 302 to a signed URL on a
  second origin (the "CDN") with `X-Linked-Etag` (its sha256), `X-Linked-Size` and
  `X-Repo-Commit`, so the client drops its token there as it does for the real CDN.
- Errors carry `X-Error-Code` and `X-Error-Message` (RepoNotFound, RevisionNotFound,
  EntryNotFound, GatedRepo, invalid credentials), which huggingface_hub turns into its exceptions.

No file is served through Xet (no `X-Xet-Hash`), like a repo whose files predate Xet; the
client then downloads over plain HTTP. `expand=True` tree listings and Range requests are not
implemented. A repository is a folder: adding another folder under the same id makes a new
commit on the branch, so older commits stay downloadable by their id.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import mimetypes
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

logger = logging.getLogger(__name__)

Access = Literal["public", "gated", "private"]
Origin = Literal["hub", "cdn"]
# From the Hub's default .gitattributes; bigger files cannot be pushed without LFS either.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".model", ".pkl")
LFS_MIN_SIZE = 10 * 1024 * 1024
TREE_PAGE_SIZE = 1000
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


@dataclass(frozen=True)
class Recorded:
    """One request as it reached the stand-in; header names are lower case."""

    method: str
    origin: Origin
    path: str  # as sent, still percent-encoded, without the query
    query: dict[str, list[str]]
    headers: dict[str, str]
    status: int


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class _Blob:
    data: bytes
    oid: str  # git blob id: of the content, or of the LFS pointer
    sha256: str | None  # set for LFS files
    pointer_size: int = 0


@dataclass(frozen=True)
class _Commit:
    oid: str
    files: dict[str, _Blob]
    dirs: dict[str, str]  # folder path -> git tree id


@dataclass
class _Repo:
    repo_id: str
    access: Access
    commits: dict[str, _Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)


def _git_id(kind: str, body: bytes) -> str:
    return hashlib.sha1(f"{kind} {len(body)}\0".encode() + body).hexdigest()


def _blob(path: str, data: bytes) -> _Blob:
    if not (path.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE):
        return _Blob(data, _git_id("blob", data), None)
    sha256 = hashlib.sha256(data).hexdigest()
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
    return _Blob(data, _git_id("blob", pointer), sha256, len(pointer))


def _tree_id(files: dict[str, _Blob], prefix: str, dirs: dict[str, str]) -> str:
    """Git's tree id for the folder `prefix`, recording every sub-folder's id in `dirs`."""
    children: dict[str, tuple[str, str]] = {}
    for path, blob in files.items():
        name, _, rest = path[len(prefix) :].partition("/")
        if rest:
            children.setdefault(name + "/", ("40000", ""))
        else:
            children[name] = ("100644", blob.oid)
    body = b""
    for key in sorted(children):  # git orders a folder as its name followed by "/"
        mode, oid = children[key]
        name = key.rstrip("/")
        if mode == "40000":
            sub = [p for p in files if p.startswith(prefix + name + "/")]
            oid = _tree_id({p: files[p] for p in sub}, prefix + name + "/", dirs)
            dirs[prefix + name] = oid
        body += f"{mode} {name}\0".encode() + bytes.fromhex(oid)
    return _git_id("tree", body)


def _json(status: int, payload: object, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps(payload).encode()
    return Reply(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body)


def _error(status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> Reply:
    extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {}), **(headers or {})}
    return _json(status, {"error": message}, extra)


class HubStandin:
    """The Hub's API on one local port and its file CDN on another; `requests` records both."""

    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self._repos: dict[str, _Repo] = {}
        self._lfs: dict[str, bytes] = {}
        self._secret = secrets.token_bytes(16)
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        self._servers: list[_Server] = []
        self._threads: list[threading.Thread] = []

    # ---- content ----------------------------------------------------------------------
    def add_repo(self, repo_id: str, folder: Path, *, branch: str = "main", access: Access = "public") -> str:
        """Commit every file under `folder` as the new head of `branch`; returns the commit id."""
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
        blobs = {path: _blob(path, source.read_bytes()) for path, source in files.items()}
        dirs: dict[str, str] = {}
        tree = _tree_id(blobs, "", dirs)
        with self._lock:
            repo = self._repos.setdefault(repo_id, _Repo(repo_id, access))
            repo.access = access
            parent = repo.refs.get(branch)
            stamp = 1_700_000_000 + len(repo.commits)
            text = f"tree {tree}\n" + (f"parent {parent}\n" if parent else "")
            for role in ("author", "committer"):
                text += f"{role} standin <standin@localhost> {stamp} +0000\n"
            text += f"\nUpload {folder.name}\n"
            commit = _Commit(_git_id("commit", text.encode()), blobs, dirs)
            repo.commits[commit.oid] = commit
            repo.refs[branch] = commit.oid
            self._lfs.update({b.sha256: b.data for b in blobs.values() if b.sha256})
        return commit.oid

    # ---- lifecycle --------------------------------------------------------------------
    def start(self) -> HubStandin:
        origins: tuple[Origin, ...] = ("hub", "cdn")
        for origin in origins:
            server = _Server(self, origin)
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=f"hub-standin-{origin}", daemon=True
            )
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> HubStandin:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The value for HF_ENDPOINT."""
        return self._servers[0].base_url

    @property
    def cdn_url(self) -> str:
        return self._servers[1].base_url

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    # ---- dispatch ---------------------------------------------------------------------
    def handle(self, origin: Origin, method: str, raw_path: str, headers: dict[str, str]) -> Reply:
        split = urlsplit(raw_path)
        query = parse_qs(split.query)
        if origin == "cdn":
            reply = self._cdn(split.path, query)
        else:
            reply = self._hub(method, split.path, query, headers)
        with self._lock:
            self._requests.append(Recorded(method, origin, split.path, query, headers, reply.status))
        return reply

    def _hub(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str]) -> Reply:
        parts = [unquote(part) for part in path.split("/")[1:]]
        authorization = headers.get("authorization")
        if authorization is not None and authorization != f"Bearer {self.token}":
            return _error(401, None, INVALID_CREDENTIALS)
        authenticated = authorization is not None
        if parts == ["api", "agent-harnesses"]:  # the client's best-effort agent detection: an empty registry
            return _json(200, {"standardEnvVars": [], "harnesses": {}})
        if parts[:2] == ["api", "models"] and len(parts) >= 4 and method == "GET":
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if not rest:
                return self._model_info(repo_id, "main", authenticated)
            if rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo_id, rest[1], authenticated)
            if rest[0] == "tree" and len(rest) >= 2:
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), query, authenticated)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), authenticated)
        return _error(404, None, "Sorry, we can't find the page you are looking for.")

    def _find(self, repo_id: str, revision: str, authenticated: bool, file: bool) -> _Commit | Reply:
        """The commit for `revision`, or the error the Hub gives for this caller."""
        repo = self._repos.get(repo_id)
        if repo is None or (repo.access == "private" and not authenticated):
            return _error(404 if authenticated else 401, "RepoNotFound", "Repository not found")
        if repo.access == "gated" and file and not authenticated:
            message = (
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
                "to access it. Please log in."
            )
            return _error(401, "GatedRepo", message)
        oid = repo.refs.get(revision, revision)
        if oid not in repo.commits:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo.commits[oid]

    def _model_info(self, repo_id: str, revision: str, authenticated: bool) -> Reply:
        commit = self._find(repo_id, revision, authenticated, file=False)
        if isinstance(commit, Reply):
            return commit
        repo = self._repos[repo_id]
        date = "2023-11-14T22:13:20.000Z"
        has_safetensors = any(path.endswith(".safetensors") for path in commit.files)
        return _json(
            200,
            {
                "_id": commit.oid[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": date,
                "createdAt": date,
                "private": repo.access == "private",
                "gated": "auto" if repo.access == "gated" else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": ["transformers"] + (["safetensors"] if has_safetensors else []),
                "library_name": "transformers",
                "pipeline_tag": "text-generation",
                "siblings": [{"rfilename": path} for path in commit.files],
                "usedStorage": sum(len(blob.data) for blob in commit.files.values()),
            },
        )

    def _tree(self, repo_id: str, revision: str, folder: str, query: dict[str, list[str]], authenticated: bool) -> Reply:
        commit = self._find(repo_id, revision, authenticated, file=False)
        if isinstance(commit, Reply):
            return commit
        if folder and folder not in commit.dirs:
            return _error(404, "EntryNotFound", f'{folder} does not exist on "{revision}"')
        recursive = query.get("recursive", ["false"])[0].lower() == "true"
        prefix = folder + "/" if folder else ""

        def listed(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

        entries: list[dict[str, object]] = [
            {"type": "directory", "oid": oid, "size": 0, "path": path}
            for path, oid in sorted(commit.dirs.items())
            if listed(path)
        ]
        for path, blob in sorted(commit.files.items()):
            if listed(path):
                entry: dict[str, object] = {"type": "file", "oid": blob.oid, "size": len(blob.data), "path": path}
                if blob.sha256:
                    entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": blob.pointer_size}
                entries.append(entry)
        start = int(query.get("cursor", ["0"])[0])
        headers = {}
        if start + TREE_PAGE_SIZE < len(entries):
            params = urlencode({"recursive": str(recursive).lower(), "cursor": start + TREE_PAGE_SIZE})
            tree_path = f"/api/models/{repo_id}/tree/{quote(revision, safe='')}"
            tree_path += f"/{quote(folder, safe='')}" if folder else ""
            headers["Link"] = f'<{self.url}{tree_path}?{params}>; rel="next"'
        return _json(200, entries[start : start + TREE_PAGE_SIZE], headers)

    def _resolve(self, repo_id: str, revision: str, filename: str, authenticated: bool) -> Reply:
        commit = self._find(repo_id, revision, authenticated, file=True)
        if isinstance(commit, Reply):
            return commit
        headers = {"X-Repo-Commit": commit.oid}
        blob = commit.files.get(filename)
        if blob is None:
            return _error(404, "EntryNotFound", "Entry not found", headers)
        name = filename.rsplit("/", 1)[-1]
        disposition = f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"
        if blob.sha256 is None:
            content_type = mimetypes.guess_type(name)[0] or "text/plain"
            headers.update({"ETag": f'"{blob.oid}"', "Content-Type": content_type, "Content-Disposition": disposition})
            return Reply(200, headers, blob.data)
        expires = int(time.time()) + 3600
        params = urlencode(
            {"response-content-disposition": disposition, "Expires": expires, "Signature": self._signature(blob.sha256, expires)}
        )
        location = f"{self.cdn_url}/repos/{blob.sha256}?{params}"
        body = f"Found. Redirecting to {location}".encode()
        headers.update(
            {
                "Location": location,
                "Content-Type": "text/plain; charset=utf-8",
                "ETag": f'W/"{len(body):x}-{hashlib.sha1(body).hexdigest()[:27]}"',
                "X-Linked-Etag": f'"{blob.sha256}"',
                "X-Linked-Size": str(len(blob.data)),
            }
        )
        return Reply(302, headers, body)

    def _cdn(self, path: str, query: dict[str, list[str]]) -> Reply:
        """A signed-URL object store: no auth header, only the signature the Hub handed out."""
        sha256 = path.rsplit("/", 1)[-1]
        expires = query.get("Expires", ["0"])[0]
        signature = query.get("Signature", [""])[0]
        valid = expires.isdigit() and int(expires) > time.time()
        valid = valid and hmac.compare_digest(signature, self._signature(sha256, int(expires)))
        if not path.startswith("/repos/") or sha256 not in self._lfs or not valid:
            body = b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>AccessDenied</Code></Error>"
            return Reply(403, {"Content-Type": "application/xml"}, body)
        disposition = query.get("response-content-disposition", ["attachment"])[0]
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{sha256}"'}
        headers["Content-Disposition"] = disposition
        return Reply(200, headers, self._lfs[sha256])

    def _signature(self, sha256: str, expires: int) -> str:
        return hmac.new(self._secret, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, standin: HubStandin, origin: Origin) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.standin = standin
        self.origin = origin

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every reply has a Content-Length
    server: _Server

    def do_GET(self) -> None:
        self._answer("GET")

    def do_HEAD(self) -> None:
        self._answer("HEAD")

    def _answer(self, method: str) -> None:
        headers = {name.lower(): value for name, value in self.headers.items()}
        reply = self.server.standin.handle(self.server.origin, method, self.path, headers)
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(reply.body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("%s %s", self.server.origin, format % args)
