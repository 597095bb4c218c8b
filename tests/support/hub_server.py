"""A small Hugging Face Hub for the tests: the HTTP endpoints that `huggingface_hub` (create_repo, upload_folder,
hf_hub_download, snapshot_download, HfFileSystem), `transformers` (`from_pretrained`) and `datasets`
(`load_dataset`, streaming or not) call, on the standard library only. A test fixture, not part of the package.

What it serves (checked against huggingface_hub 2.4 and datasets 5.2, with `HF_HUB_DISABLE_XET=1`):

- `POST /api/repos/create`, `GET /api/whoami-v2`, `POST /api/validate-yaml`;
- `GET /api/{models,datasets}/<repo>[/revision/<rev>]` (info with `sha`, `siblings`, `private`),
  `GET .../tree/<rev>[/<path>]?recursive=`, `POST .../paths-info/<rev>`, `POST .../preupload/<rev>`,
  `POST .../commit/<rev>` (NDJSON: header, file, lfsFile, deletedFile, deletedFolder);
- `POST /[datasets/]<repo>.git/info/lfs/objects/batch` (basic transfer): the upload href points at a second
  listener, the "storage" origin, with a signature in the query instead of a token (like a presigned URL);
- `HEAD|GET /[datasets/]<repo>/resolve/<rev>/<path>`: regular files are served with `X-Repo-Commit` and
  `ETag` (git blob sha1); LFS files answer `302` with `Location` on the storage origin, `X-Linked-Etag`
  (sha256) and `X-Linked-Size`, as the real Hub redirects to its CDN. `Range: bytes=a-b` and `bytes=a-` work.

Repositories have branches (`main`) and commits (40-hex shas); any commit sha is a revision. Writes need
`Authorization: Bearer <token>` for a token given to the server and a repo in that user's namespace (401 / 403
otherwise); private repos are readable only with the owner's token (401, like the Hub). Files live in a temp
folder given by the caller. Only 127.0.0.1 is bound; `stop()` shuts both listeners down.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit


MAX_BODY = 512 * 1024 * 1024  # largest request body accepted (bytes)
LFS_THRESHOLD = 10 * 1024 * 1024  # files this large go to LFS, like the Hub
# the `.gitattributes` of a new repository (the first commit), as the Hub writes it (shortened)
GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack",
                    "*.parquet", "*.arrow", "*.zip", "*.tar", "*.tar.gz", "*.gz", "*.npy", "*.npz", "*.jpg", "*.png")
)
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


class HubError(Exception):
    """An HTTP error answer: status, `X-Error-Code` (as the Hub sends it) and message."""

    def __init__(self, status: int, message: str, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str
    lfs: bool  # stored as an LFS object (its git blob is the pointer file)


@dataclass
class Commit:
    sha: str
    parent: Optional[str]
    message: str
    date: str
    files: dict  # path -> FileEntry


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict = field(default_factory=dict)  # name -> commit sha
    commits: dict = field(default_factory=dict)  # sha -> Commit


class HubStore:
    """Repositories, commits and content-addressed blobs (by sha256) under `root`; thread safe."""

    def __init__(self, root: str, tokens: dict):
        self.root = root
        self.tokens = dict(tokens)  # token -> user name
        self.repos: dict = {}  # (repo_type, repo_id) -> Repo
        self.blob_ids: dict = {}  # sha256 -> git blob id of the content
        self.lock = threading.Lock()
        self.secret = secrets.token_bytes(16)
        os.makedirs(os.path.join(root, "blobs"), exist_ok=True)

    # --- blobs ---
    def blob_path(self, sha256: str) -> str:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise HubError(400, f"invalid sha256 {sha256!r}")
        return os.path.join(self.root, "blobs", sha256)

    def has_blob(self, sha256: str) -> bool:
        return os.path.isfile(self.blob_path(sha256))

    def put_blob(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.blob_path(sha256)
        if not os.path.isfile(path):
            partial = f"{path}.{threading.get_ident()}.tmp"  # one per thread: the same blob may arrive twice at once
            with open(partial, "wb") as handle:
                handle.write(data)
            os.replace(partial, path)
        self.blob_ids[sha256] = git_blob_sha1(data)
        return sha256

    def read_blob(self, sha256: str) -> bytes:
        with open(self.blob_path(sha256), "rb") as handle:
            return handle.read()

    def oid(self, entry: FileEntry) -> str:
        return git_blob_sha1(lfs_pointer(entry.sha256, entry.size)) if entry.lfs else self.blob_ids[entry.sha256]

    def sign(self, sha256: str, size: int) -> str:
        return hmac.new(self.secret, f"{sha256}:{size}".encode(), "sha256").hexdigest()

    # --- auth ---
    def user(self, authorization: Optional[str]) -> Optional[str]:
        """The user of a `Bearer` token; None without a header; 401 for an unknown token."""
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token.strip()]

    def check_write(self, user: Optional[str], repo_id: str) -> None:
        if user is None:
            raise HubError(401, "Writing to the Hub needs a token: no Authorization header was sent")
        if repo_id.split("/")[0] != user:
            raise HubError(403, f"You don't have the rights to write to {repo_id} (token of user {user})")

    # --- repositories ---
    def create(self, repo_type: str, repo_id: str, private: bool, user: Optional[str]) -> Repo:
        self.check_write(user, repo_id)
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, "You already created this repo")
            repo = Repo(repo_type, repo_id, private)
            self.repos[(repo_type, repo_id)] = repo
            sha256 = self.put_blob(GITATTRIBUTES.encode())
            self._add_commit(repo, None, "initial commit", {".gitattributes": FileEntry(len(GITATTRIBUTES), sha256, False)})
            return repo

    def get(self, repo_type: str, repo_id: str, user: Optional[str]) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and repo_id.split("/")[0] != user):
            status = 401 if repo is not None or user is None else 404
            raise HubError(status, f"Repository {repo_id} not found", code="RepoNotFound")
        return repo

    def resolve(self, repo: Repo, revision: str) -> Commit:
        sha = repo.branches.get(revision, revision)
        if sha not in repo.commits:
            raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return repo.commits[sha]

    def _add_commit(self, repo: Repo, parent: Optional[Commit], message: str, files: dict, branch: str = "main") -> Commit:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        listing = json.dumps(sorted((path, entry.sha256) for path, entry in files.items()))
        seed = f"{parent.sha if parent else ''}\n{message}\n{listing}\n{len(repo.commits)}"
        sha = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(sha, parent.sha if parent else None, message, stamp, files)
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit

    def commit(self, repo: Repo, revision: str, user: Optional[str], lines: list) -> Commit:
        """Applies an NDJSON commit (already parsed into `lines`) on the branch `revision`."""
        self.check_write(user, repo.repo_id)
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "the commit payload must start with a header line")
        header = lines[0].get("value", {})
        with self.lock:
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", code="RevisionNotFound")
            parent = repo.commits[repo.branches[revision]]
            if header.get("parentCommit") not in (None, parent.sha):
                raise HubError(412, f"parentCommit {header['parentCommit']} is not the head of {revision}")
            files = dict(parent.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = value.get("path", "")
                if not path or path.startswith("/") or ".." in path.split("/"):
                    raise HubError(400, f"invalid path in commit: {path!r}")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"{path}: only base64 content is supported")
                    data = base64.b64decode(value["content"])
                    files[path] = FileEntry(len(data), self.put_blob(data), False)
                elif key == "lfsFile":
                    sha256 = value.get("oid", "")
                    if not self.has_blob(sha256):
                        raise HubError(422, f"{path}: LFS object {sha256} was not uploaded")
                    size = os.path.getsize(self.blob_path(sha256))
                    if value.get("size") not in (None, size):
                        raise HubError(422, f"{path}: LFS object {sha256} has {size} bytes, not {value['size']}")
                    files[path] = FileEntry(size, sha256, True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    for name in [name for name in files if name.startswith(prefix)]:
                        del files[name]
                else:
                    raise HubError(400, f"unknown commit operation {key!r}")
            return self._add_commit(repo, parent, header.get("summary") or "commit", files, branch=revision)

    def is_lfs_path(self, commit: Commit, path: str, size: int) -> bool:
        """LFS when the file is 10 MB or more, or when a `filter=lfs` pattern of the commit's `.gitattributes`
        matches it (a pattern without `/` matches the file name, as in git)."""
        if size >= LFS_THRESHOLD:
            return True
        entry = commit.files.get(".gitattributes")
        if entry is None:
            return False
        for line in self.read_blob(entry.sha256).decode("utf-8", "replace").splitlines():
            pattern, *attributes = line.split() or [""]
            if "filter=lfs" in attributes:
                target = path if "/" in pattern.strip("/") else path.rsplit("/", 1)[-1]
                if fnmatch.fnmatch(target, pattern.strip("/")):
                    return True
        return False

    # --- listings ---
    def entry_json(self, path: str, entry: FileEntry) -> dict:
        item = {"type": "file", "path": path, "size": entry.size, "oid": self.oid(entry)}
        if entry.lfs:
            item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": len(lfs_pointer(entry.sha256, entry.size))}
        return item

    def tree(self, commit: Commit, folder: str, recursive: bool) -> list:
        """Entries under `folder` ("" for the root): files and folders, folders first, like the Hub."""
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        if prefix and not any(path.startswith(prefix) for path in commit.files):
            raise HubError(404, f"{folder} does not exist", code="EntryNotFound")
        folders, files = {}, []
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                name = prefix + "/".join(parts[:depth])
                folders[name] = {"type": "directory", "path": name, "oid": hashlib.sha1(name.encode()).hexdigest(), "size": 0}
            if recursive or len(parts) == 1:
                files.append(self.entry_json(path, commit.files[path]))
        return list(folders.values()) + files

    def paths_info(self, commit: Commit, paths: list) -> list:
        result = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                result.append(self.entry_json(path, commit.files[path]))
            elif any(name.startswith(path + "/") for name in commit.files):
                result.append({"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0})
        return result

    def info(self, repo: Repo, commit: Commit) -> dict:
        return {
            "id": repo.repo_id, "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "author": repo.repo_id.split("/")[0], "sha": commit.sha, "lastModified": commit.date,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the store; any `HubError` becomes the matching HTTP answer."""

    protocol_version = "HTTP/1.1"
    server: "_Listener"

    ROUTES = [
        ("POST", r"/api/repos/create", "create_repo"),
        ("GET", r"/api/whoami-v2", "whoami"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", r"/api/(?P<kind>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
        ("GET", r"/api/(?P<kind>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
        ("POST", r"/api/(?P<kind>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("POST", r"/api/(?P<kind>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", r"/api/(?P<kind>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", "commit"),
        ("POST", r"/(?:(?P<kind>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
        ("GET", r"/(?:(?P<kind>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
    STORAGE_ROUTES = [
        ("PUT", r"/upload/(?P<sha>[0-9a-f]{64})", "lfs_put"),
        ("GET", r"/lfs/(?P<sha>[0-9a-f]{64})", "lfs_get"),
    ]

    def log_message(self, format, *args):  # requests are recorded in `server.hub.requests`, not printed
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.server.hub.requests.append(f"{method} {url.path}")
        try:
            body = self._read_body()
            routes = self.STORAGE_ROUTES if self.server.storage else self.ROUTES
            for route_method, pattern, name in routes:
                match = re.fullmatch(pattern, url.path)
                if match and (route_method == method or (route_method == "GET" and method == "HEAD")):
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    getattr(self, "_" + name)(body=body, head=method == "HEAD", **params)
                    return
            raise HubError(404, f"no route for {method} {url.path}")
        except (KeyError, TypeError, ValueError) as err:  # a malformed request body or header
            self.close_connection = True
            self._send_json({"error": f"malformed request: {type(err).__name__}: {err}"}, status=400, head=method == "HEAD")
        except HubError as err:
            self.close_connection = err.status == 413  # the body was not read
            self._send_json({"error": err.message}, status=err.status, error=err, head=method == "HEAD")

    def _read_body(self) -> bytes:
        """The request body, `Content-Length` or chunked, at most `MAX_BODY` bytes."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:  # bounded: each chunk adds to `total`, checked against MAX_BODY
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    for _ in range(100):  # trailers, up to the blank line
                        if self.rfile.readline() in (b"\r\n", b"\n", b""):
                            return b"".join(chunks)
                    raise HubError(400, "too many trailer lines")
                total += size
                if size < 0 or total > MAX_BODY:
                    raise HubError(413, "request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0 or length > MAX_BODY:
            raise HubError(413, "request body too large")
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: Optional[dict] = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_json(self, data, status: int = 200, error: Optional[HubError] = None, head: bool = False) -> None:
        headers = {"Content-Type": "application/json"}
        if error is not None:
            headers["X-Error-Message"] = error.message
            if error.code:
                headers["X-Error-Code"] = error.code
        self._send(status, json.dumps(data).encode(), headers, head=head)

    @property
    def store(self) -> HubStore:
        return self.server.hub.store

    def _user(self) -> Optional[str]:
        return self.store.user(self.headers.get("Authorization"))

    def _repo(self, kind: Optional[str], repo: str) -> Repo:
        return self.store.get(_TYPES.get(kind or "models", "model"), repo, self._user())

    def _json_body(self, body: bytes):
        try:
            return json.loads(body or b"{}")
        except ValueError as err:
            raise HubError(400, f"request body is not JSON: {err}") from err

    # --- API ---
    def _create_repo(self, body, head):
        payload = self._json_body(body)
        repo_id = f"{payload.get('organization') or self._user()}/{payload.get('name')}"
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id):
            raise HubError(400, f"invalid repo id {repo_id!r}")
        repo_type = payload.get("type") or "model"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.server.hub.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        try:
            self.store.create(repo_type, repo_id, private, self._user())
        except HubError as err:
            if err.status != 409:
                raise
            self._send_json({"error": err.message, "url": url}, status=409, error=err)  # the Hub sends the url too
            return
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _whoami(self, body, head):
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._send_json({"type": "user", "name": user, "orgs": [], "auth": {"type": "access_token",
                         "accessToken": {"displayName": "tests", "role": "write"}}}, head=head)

    def _validate_yaml(self, body, head):
        self._send_json({"errors": [], "warnings": []})

    def _repo_info(self, kind, repo, body, head, rev="main"):
        repo = self._repo(kind, repo)
        self._send_json(self.store.info(repo, self.store.resolve(repo, rev)), head=head)

    def _tree(self, kind, repo, rev, body, head, path=""):
        repo = self._repo(kind, repo)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        self._send_json(self.store.tree(self.store.resolve(repo, rev), path, recursive), head=head)

    def _paths_info(self, kind, repo, rev, body, head):
        repo = self._repo(kind, repo)
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = self._json_body(body).get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        self._send_json(self.store.paths_info(self.store.resolve(repo, rev), paths))

    def _preupload(self, kind, repo, rev, body, head):
        repo = self._repo(kind, repo)
        self.store.check_write(self._user(), repo.repo_id)
        commit = self.store.resolve(repo, rev)
        files = []
        for item in self._json_body(body).get("files", []):
            lfs = self.store.is_lfs_path(commit, item["path"], int(item["size"]))
            existing = commit.files.get(item["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if lfs else self.store.oid(existing)
            files.append({"path": item["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send_json({"files": files, "commitOid": commit.sha})

    def _commit(self, kind, repo, rev, body, head):
        repo = self._repo(kind, repo)
        if self.query.get("create_pr", ["0"])[0] not in ("0", ""):
            raise HubError(400, "pull requests (create_pr) are not supported by the test Hub")
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except ValueError as err:
            raise HubError(400, f"commit payload is not NDJSON: {err}") from err
        commit = self.store.commit(repo, rev, self._user(), lines)
        url = f"{self.server.hub.url}/{_URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.sha}"
        self._send_json({"success": True, "commitOid": commit.sha, "commitUrl": url})

    def _lfs_batch(self, body, head, repo, kind=None):
        repo = self._repo(kind, repo)
        payload = self._json_body(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "only the upload operation is supported")
        self.store.check_write(self._user(), repo.repo_id)
        objects = []
        for item in payload.get("objects", []):
            oid, size = item["oid"], int(item["size"])
            entry = {"oid": oid, "size": size}
            if not self.store.has_blob(oid):
                href = f"{self.server.hub.storage_url}/upload/{oid}?size={size}&sig={self.store.sign(oid, size)}"
                entry["actions"] = {"upload": {"href": href}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   {"Content-Type": "application/vnd.git-lfs+json"})

    def _resolve(self, repo, rev, path, body, head, kind=None):
        repo = self._repo(kind, repo)
        commit = self.store.resolve(repo, rev)
        headers = {"X-Repo-Commit": commit.sha}
        entry = commit.files.get(path)
        if entry is None:
            err = HubError(404, f"{path} does not exist at {rev}", code="EntryNotFound")
            self._send(404, json.dumps({"error": err.message}).encode(),
                       dict(headers, **{"X-Error-Code": err.code, "X-Error-Message": err.message}), head=head)
            return
        if entry.lfs:  # like the Hub: a redirect to the storage (CDN) origin, metadata on the redirect itself
            headers.update({"Location": f"{self.server.hub.storage_url}/lfs/{entry.sha256}",
                            "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size),
                            "ETag": f'"{self.store.oid(entry)}"'})
            self._send(302, b"", headers, head=head)
            return
        headers["ETag"] = f'"{self.store.oid(entry)}"'
        self._send_content(self.store.read_blob(entry.sha256), headers, head)

    def _send_content(self, data: bytes, headers: dict, head: bool) -> None:
        headers = dict(headers, **{"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"})
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        if match is None:
            self._send(200, data, headers, head=head)
            return
        start = int(match.group(1))
        end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
        if start >= len(data) or start > end:
            self._send(416, b"", dict(headers, **{"Content-Range": f"bytes */{len(data)}"}), head=head)
            return
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(206, data[start:end + 1], headers, head=head)

    # --- storage origin ---
    def _lfs_put(self, sha, body, head):
        size = int(self.query.get("size", ["-1"])[0])
        if not hmac.compare_digest(self.query.get("sig", [""])[0], self.store.sign(sha, size)):
            raise HubError(403, "invalid upload signature")
        if len(body) != size or hashlib.sha256(body).hexdigest() != sha:
            raise HubError(400, f"uploaded content does not match oid {sha} and size {size}")
        self.store.put_blob(body)
        self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _lfs_get(self, sha, body, head):
        if not self.store.has_blob(sha):
            raise HubError(404, f"no LFS object {sha}")
        self._send_content(self.store.read_blob(sha), {"ETag": f'"{sha}"'}, head)


class _Listener(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: "HubServer", storage: bool):
        self.hub, self.storage = hub, storage
        super().__init__(("127.0.0.1", 0), _Handler)


class HubServer:
    """The Hub on 127.0.0.1 (API + resolve) and a second port (LFS storage); use as a context manager.

    Args:
        root: folder for the blobs (e.g. a pytest `tmp_path`).
        tokens: `{token: user_name}` accepted for writes (and for reading that user's private repos).
    """

    def __init__(self, root: str, tokens: dict):
        self.store = HubStore(root, tokens)
        self.requests: list = []  # "METHOD /path" of every request, for the tests
        self._api = _Listener(self, storage=False)
        self._storage = _Listener(self, storage=True)
        self.url = f"http://127.0.0.1:{self._api.server_address[1]}"
        self.storage_url = f"http://127.0.0.1:{self._storage.server_address[1]}"
        self._threads = [threading.Thread(target=listener.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
                         for listener in (self._api, self._storage)]

    def start(self) -> "HubServer":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        for listener in (self._api, self._storage):
            listener.shutdown()
            listener.server_close()
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
