"""A small in-process stand-in for the Hugging Face Hub, for tests that push and pull models.

The real Hub is unreachable from the test machines, yet ``push_to_hub`` and ``from_pretrained("user/repo")``
are user-facing features that must be exercised end to end.  This module implements the subset of the
Hub's HTTP API that ``huggingface_hub`` 2.x speaks when Xet is disabled (``HF_HUB_DISABLE_XET=1``):

* uploads: ``/api/repos/create``, ``/api/validate-yaml``, ``/api/models/{repo}/preupload/{rev}``, the Git LFS
  batch API ``/{repo}.git/info/lfs/objects/batch`` (basic transfer, with a PUT target and a verify step served
  by this same server) and the NDJSON ``/api/models/{repo}/commit/{rev}``;
* branches: ``POST /api/models/{repo}/branch/{branch}`` (from ``main``'s head);
* reads: ``/api/models/{repo}[/revision/{rev}]``, ``/api/models/{repo}/tree/{rev}[/{path}]``,
  ``/api/whoami-v2`` and ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with the headers the client relies on
  (``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``X-Error-Code`` on 404).

It is deliberately strict where the real Hub is strict, so that a test passing here means something: write
routes need the bearer token, uploaded LFS objects are checked against their sha256, a commit may only
reference LFS objects that were uploaded, ``README.md`` front matter is parsed as YAML, and every commit gets
its own immutable snapshot addressable by its sha.

Use it as a context manager (or ``start()``/``stop()``); the server also shuts itself down after
``max_lifetime_s`` so a crashed test can never leave it running.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["FakeHub", "StoredFile"]

FAKE_TOKEN = "hf_fake_token_for_tests"
_REPO = r"(?P<repo>[\w.\-]+/[\w.\-]+)"
_LFS_POINTER_SIZE = 134  # what the Hub reports for a git-lfs pointer file; clients only display it


def git_blob_sha1(data: bytes) -> str:
    """Git's object id of a blob: what the Hub reports as the oid/ETag of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit snapshot.  LFS files are identified by the sha256 of their content."""

    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def git_oid(self) -> str:
        return git_blob_sha1(self.data)

    @property
    def etag(self) -> str:
        """The identifier the client caches the blob under: sha256 for LFS files, git sha1 otherwise."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class Commit:
    """An immutable snapshot of a repository."""

    sha: str
    title: str
    files: dict[str, StoredFile]
    date: float = field(default_factory=time.time)


@dataclass
class Repo:
    """A model repository: ``main``'s commits, and the other branches' (each starting at the commit it
    branched from)."""

    repo_id: str
    commits: list[Commit]
    branches: dict[str, list[Commit]] = field(default_factory=dict)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def history(self, branch: str) -> list[Commit] | None:
        """The commits of ``branch`` (``refs/heads/`` optional), ``None`` if there is no such branch."""
        branch = branch.removeprefix("refs/heads/")
        return self.commits if branch == "main" else self.branches.get(branch)

    def resolve(self, revision: str) -> Commit | None:
        """Map a branch name or a full commit sha to its snapshot, like the Hub's revision resolution."""
        history = self.history(revision)
        if history is not None:
            return history[-1]
        for commit in [*self.commits, *(commit for branch in self.branches.values() for commit in branch)]:
            if commit.sha == revision:
                return commit
        return None


class HubError(Exception):
    """Raised inside a handler to answer with an HTTP error the way the Hub does."""

    def __init__(self, status: int, message: str, error_code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.commit = commit


class FakeHub:
    """An in-memory Hub on ``127.0.0.1`` (random free port) serving the routes ``huggingface_hub`` needs.

    Attributes:
        url: the endpoint to put into ``HF_ENDPOINT``.
        token: the only bearer token accepted on write routes.
        requests: ``(method, path)`` of every request served, for tests that assert on the traffic.
    """

    def __init__(self, *, user: str = "user", token: str = FAKE_TOKEN, max_lifetime_s: float = 300.0):
        self.user = user
        self.token = token
        self.max_lifetime_s = max_lifetime_s
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.create_requests: list[dict] = []  # the bodies of create-repo requests (visibility included)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._deadline: threading.Timer | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        """Bind a free port and serve in a daemon thread; arm the lifetime timer."""
        hub = self

        class Handler(_HubRequestHandler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        self._deadline = threading.Timer(self.max_lifetime_s, self.stop)
        self._deadline.daemon = True
        self._deadline.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port.  Safe to call twice (the lifetime timer may race a teardown)."""
        with self._lock:
            server, self._server = self._server, None
            deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline is not threading.current_thread():
            deadline.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test helpers
    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Content of every file of ``repo_id`` at ``revision``: what a test asserts the push produced."""
        commit = self._commit(repo_id, revision)
        return {path: stored.data for path, stored in commit.files.items()}

    def stored(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        """Like :meth:`files` but with the LFS flag, to check which files went through LFS."""
        return dict(self._commit(repo_id, revision).files)

    # ------------------------------------------------------------------ state changes (called by the handler)
    def _repo(self, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit(self, repo_id: str, revision: str) -> Commit:
        repo = self._repo(repo_id)
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def create_repo(self, repo_id: str) -> bool:
        """Create ``repo_id`` with an initial ``.gitattributes`` commit, as the Hub does; False if it exists."""
        with self._lock:
            if repo_id in self.repos:
                return False
            attributes = StoredFile(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n", lfs=False)
            files = {".gitattributes": attributes}
            sha = hashlib.sha1(f"{repo_id}:initial".encode()).hexdigest()
            self.repos[repo_id] = Repo(repo_id, [Commit(sha, "initial commit", files)])
            return True

    def create_branch(self, repo_id: str, branch: str) -> None:
        """Start ``branch`` at ``main``'s head; 409 if it exists, as the Hub answers."""
        with self._lock:
            repo = self._repo(repo_id)
            if repo.history(branch) is not None:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            repo.branches[branch] = [repo.head]

    def apply_commit(self, repo_id: str, revision: str, lines: list[dict[str, Any]]) -> Commit:
        """Apply NDJSON commit operations on top of the branch head and return the new snapshot."""
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line of a commit must be the header")
        title = lines[0]["value"].get("summary") or ""
        if not title:
            raise HubError(400, "Commit summary is empty")
        with self._lock:
            repo = self._repo(repo_id)
            history = repo.history(revision)
            if history is None:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = history[-1]
            parent = lines[0]["value"].get("parentCommit")
            if parent is not None and parent != head.sha:
                raise HubError(412, "Parent commit is not the head of the branch")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding for {path}")
                    files[path] = StoredFile(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    data = self.lfs_objects.get(value.get("oid", ""))
                    if data is None:
                        raise HubError(400, f"LFS object {value.get('oid')} for {path} was never uploaded")
                    files[path] = StoredFile(data, lfs=True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for name in [name for name in files if name.startswith(prefix)]:
                        del files[name]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            digest = hashlib.sha1(head.sha.encode())
            for path in sorted(files):
                digest.update(path.encode() + b"\0" + files[path].etag.encode())
            commit = Commit(digest.hexdigest(), title, files)
            history.append(commit)
            return commit


def _front_matter_errors(content: str) -> list[str]:
    """Validate README.md metadata the way the Hub's /api/validate-yaml would, for what matters to us."""
    match = re.match(r"\A---\r?\n(.*?)\r?\n---\r?\n", content, flags=re.DOTALL)
    if match is None:
        return []  # a README without metadata is valid (the Hub only warns)
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as error:
        return [f"Invalid YAML: {error}"]
    if metadata is not None and not isinstance(metadata, dict):
        return ["Metadata must be a YAML mapping"]
    tags = (metadata or {}).get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(tag, str) for tag in tags)):
        return ['"tags" must be a list of strings']
    return []


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one HTTP request to the :class:`FakeHub` bound to the subclass created in ``FakeHub.start``."""

    fake_hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects from the Hub

    # Quiet: pytest captures stderr and the access log only adds noise to failures.
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature fixed by the base class
        return

    # ------------------------------------------------------------------ plumbing
    def _read_body(self) -> bytes:
        """Read a request body sent with Content-Length or with chunked transfer encoding (streamed uploads)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        try:
            return json.loads(self._read_body() or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Body is not JSON: {error}") from error

    def _send(
        self,
        status: int,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        head_only: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if not head_only:
            self.wfile.write(body)

    def _send_json(self, payload: Any, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode())

    def _require_token(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.fake_hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _dispatch(self, method: str) -> None:
        self.fake_hub.requests.append((method, self.path))
        split = urlsplit(self.path)
        path, query = split.path, parse_qs(split.query)
        try:
            for route_method, pattern, handler in _ROUTES:
                if route_method != method:
                    continue
                match = re.fullmatch(pattern, path)
                if match is not None:
                    groups = {name: unquote(value) for name, value in match.groupdict().items() if value is not None}
                    handler(self, query=query, **groups)
                    return
            raise HubError(404, f"No route for {method} {path} on the fake Hub")
        except HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
            if error.commit:
                headers["X-Repo-Commit"] = error.commit
            body = json.dumps({"error": error.message}).encode()
            self._send(error.status, body, headers=headers, head_only=method == "HEAD")

    def do_GET(self) -> None:  # noqa: N802 - name fixed by BaseHTTPRequestHandler
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    # ------------------------------------------------------------------ routes: account and repositories
    def whoami(self, query: dict) -> None:
        self._require_token()
        self._send_json({"type": "user", "name": self.fake_hub.user, "orgs": [], "auth": {"type": "access_token"}})

    def create_repo(self, query: dict) -> None:
        self._require_token()
        payload = self._json_body()
        self.fake_hub.create_requests.append(payload)
        if payload.get("type", "model") != "model":
            raise HubError(400, "This fake Hub only hosts model repositories")
        name = payload.get("name") or ""
        if not re.fullmatch(r"[\w.\-]+", name):
            raise HubError(400, f"Invalid repository name {name!r}")
        repo_id = f"{payload.get('organization') or self.fake_hub.user}/{name}"
        url = f"{self.fake_hub.url}/{repo_id}"
        if not self.fake_hub.create_repo(repo_id):
            self._send_json({"error": "You already created this model repo", "url": url}, status=409)
            return
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def model_info(self, query: dict, repo: str, rev: str = "main") -> None:
        commit = self.fake_hub._commit(repo, rev)
        siblings = []
        for path, stored in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path, "size": len(stored.data), "blobId": stored.git_oid}
            if stored.lfs:
                sibling["lfs"] = {"size": len(stored.data), "sha256": stored.sha256, "pointerSize": _LFS_POINTER_SIZE}
            siblings.append(sibling)
        self._send_json(
            {
                "id": repo,
                "modelId": repo,
                "author": repo.split("/")[0],
                "sha": commit.sha,
                "private": False,
                "disabled": False,
                "gated": False,
                "tags": [],
                "library_name": "transformers",
                "siblings": siblings,
            }
        )

    def tree(self, query: dict, repo: str, rev: str, subpath: str = "") -> None:
        commit = self.fake_hub._commit(repo, rev)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = subpath.strip("/") + "/" if subpath.strip("/") else ""
        if prefix and not any(path.startswith(prefix) for path in commit.files):
            raise HubError(404, f"Folder {subpath} not found", "EntryNotFound", commit.sha)
        entries: dict[str, dict[str, Any]] = {}
        for path, stored in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folder = prefix + rest.split("/")[0]
                entries[folder] = {"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())}
                continue
            if recursive:  # list the intermediate folders as the Hub does
                parts = rest.split("/")[:-1]
                for depth in range(1, len(parts) + 1):
                    folder = prefix + "/".join(parts[:depth])
                    entries[folder] = {"type": "directory", "path": folder, "oid": git_blob_sha1(folder.encode())}
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(stored.data), "oid": stored.git_oid}
            if stored.lfs:
                entry["lfs"] = {"oid": stored.sha256, "size": len(stored.data), "pointerSize": _LFS_POINTER_SIZE}
            entries[path] = entry
        self._send_json(list(entries.values()))

    # ------------------------------------------------------------------ routes: uploads
    def validate_yaml(self, query: dict) -> None:
        payload = self._json_body()
        errors = _front_matter_errors(payload.get("content", ""))
        status = 400 if errors else 200
        self._send_json({"errors": [{"message": error} for error in errors], "warnings": []}, status=status)

    def preupload(self, query: dict, repo: str, rev: str) -> None:
        self._require_token()
        commit = self.fake_hub._commit(repo, rev)
        answers = []
        for file in self._json_body().get("files", []):
            path = file["path"]
            mode = "lfs" if path.endswith(".safetensors") else "regular"
            existing = commit.files.get(path)
            # The client skips unchanged files by comparing this oid with its own (sha256 for LFS, sha1 otherwise).
            oid = None if existing is None else (existing.sha256 if mode == "lfs" else existing.git_oid)
            answers.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json({"files": answers, "commitOid": commit.sha})

    def lfs_batch(self, query: dict, repo: str) -> None:
        self._require_token()
        self.fake_hub._repo(repo)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation of the LFS batch API is implemented")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], obj["size"]
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.fake_hub.lfs_objects:  # no "actions" means "already stored, skip"
                answer["actions"] = {
                    "upload": {"href": f"{self.fake_hub.url}/__lfs__/{oid}", "header": {}},
                    "verify": {"href": f"{self.fake_hub.url}/{repo}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(answer)
        self._send(
            200, json.dumps({"transfer": "basic", "objects": objects}).encode(), "application/vnd.git-lfs+json"
        )

    def lfs_put(self, query: dict, oid: str) -> None:
        # Presigned-URL semantics: the storage does not see the Hub token, it checks the content instead.
        data = self._read_body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not hash to {oid}")
        self.fake_hub.lfs_objects[oid] = data
        self._send(200, b"")

    def lfs_verify(self, query: dict, repo: str) -> None:
        self._require_token()
        payload = self._json_body()
        data = self.fake_hub.lfs_objects.get(payload.get("oid", ""))
        if data is None or len(data) != payload.get("size"):
            raise HubError(404, f"LFS object {payload.get('oid')} is missing or has the wrong size")
        self._send_json({"success": True})

    def create_branch(self, query: dict, repo: str, branch: str) -> None:
        self._require_token()
        self._read_body()  # its starting point, if any: branches start at main here
        self.fake_hub.create_branch(repo, branch)
        self._send_json({})

    def commit(self, query: dict, repo: str, rev: str) -> None:
        self._require_token()
        if "create_pr" in query:
            raise HubError(400, "Pull requests are not implemented by the fake Hub")
        if "ndjson" not in self.headers.get("Content-Type", ""):
            raise HubError(400, "A commit body must be application/x-ndjson")
        body = self._read_body().decode()
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise HubError(400, f"Malformed NDJSON line: {error}") from error
        commit = self.fake_hub.apply_commit(repo, rev, lines)
        self._send_json(
            {"success": True, "commitOid": commit.sha, "commitUrl": f"{self.fake_hub.url}/{repo}/commit/{commit.sha}"}
        )

    # ------------------------------------------------------------------ routes: downloads
    def resolve(self, query: dict, repo: str, rev: str, filename: str) -> None:
        head_only = self.command == "HEAD"
        commit = self.fake_hub._commit(repo, rev)
        stored = commit.files.get(filename)
        if stored is None:
            raise HubError(404, f"Entry not found: {filename}", "EntryNotFound", commit.sha)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{stored.git_oid}"', "Accept-Ranges": "none"}
        if stored.lfs:
            # On the Hub the ETag of an LFS file is that of its pointer; the linked ones describe the content.
            headers["X-Linked-Etag"] = f'"{stored.sha256}"'
            headers["X-Linked-Size"] = str(len(stored.data))
        self._send(200, stored.data, "application/octet-stream", headers, head_only=head_only)


_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", r"/api/whoami-v2", _HubRequestHandler.whoami),
    ("POST", r"/api/repos/create", _HubRequestHandler.create_repo),
    ("POST", r"/api/validate-yaml", _HubRequestHandler.validate_yaml),
    ("POST", rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", _HubRequestHandler.preupload),
    ("POST", rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", _HubRequestHandler.commit),
    ("POST", rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", _HubRequestHandler.create_branch),
    ("GET", rf"/api/models/{_REPO}", _HubRequestHandler.model_info),
    ("GET", rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", _HubRequestHandler.model_info),
    ("GET", rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<subpath>.+))?", _HubRequestHandler.tree),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/batch", _HubRequestHandler.lfs_batch),
    ("POST", rf"/{_REPO}\.git/info/lfs/objects/verify", _HubRequestHandler.lfs_verify),
    ("PUT", r"/__lfs__/(?P<oid>[0-9a-f]{64})", _HubRequestHandler.lfs_put),
    ("HEAD", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<filename>.+)", _HubRequestHandler.resolve),
    ("GET", rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<filename>.+)", _HubRequestHandler.resolve),
]
