#!/usr/bin/env python3
"""A ClickHouse HTTP interface over the embedded engine chdb, for local runs and tests.

Speaks enough of the real server's protocol for the `clickhouse` Rust crate: SQL in the
`query` URL parameter and/or the body (multipart/form-data when the query has `param_*`
values), INSERT data in the body (chunked, optionally in ClickHouse's LZ4 block framing
with `decompress=1`), `database`/`default_format`/settings URL parameters, and errors as
`Code: N. DB::Exception: ...` with `X-ClickHouse-Exception-Code` and the server's HTTP
statuses. Responses are never compressed; clients accept that (no Content-Encoding).

Needs chdb-core and lz4 from PyPI. Prints only `ready <host>:<port>` on stdout.
"""

import argparse
import base64
import hmac
import json
import logging
import os
import re
import signal
import sys
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import chdb.session
import lz4.block

log = logging.getLogger("chdb_server")

# URL parameters the HTTP layer consumes; every other one is a ClickHouse setting.
HTTP_ONLY = {
    "buffer_size", "client_protocol_version", "compress", "database", "decompress",
    "default_format", "max_result_bytes", "password", "query", "query_id", "quota_key",
    "role", "session_check", "session_id", "session_timeout", "stacktrace", "user",
    "wait_end_of_query", "with_stacktrace",
}

# HTTP status by exception name, as the server's exceptionCodeToHTTPStatus maps them.
STATUS_BY_ERROR = {
    **dict.fromkeys((
        "BAD_ARGUMENTS", "CANNOT_COMPILE_REGEXP", "CANNOT_PARSE_TEXT",
        "CANNOT_PARSE_ESCAPE_SEQUENCE", "CANNOT_PARSE_QUOTED_STRING", "CANNOT_PARSE_DATE",
        "CANNOT_PARSE_DATETIME", "CANNOT_PARSE_NUMBER", "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING",
        "CANNOT_PARSE_IPV4", "CANNOT_PARSE_IPV6", "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
        "CANNOT_PARSE_UUID", "DUPLICATE_COLUMN", "ILLEGAL_COLUMN", "UNKNOWN_ELEMENT_IN_AST",
        "UNKNOWN_TYPE_OF_AST_NODE", "THERE_IS_NO_COLUMN", "TOO_DEEP_AST", "TOO_BIG_AST",
        "UNEXPECTED_AST_STRUCTURE", "SYNTAX_ERROR", "INCORRECT_DATA", "TYPE_MISMATCH",
        "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE"), 400),
    **dict.fromkeys((
        "UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER", "UNKNOWN_TYPE",
        "UNKNOWN_STORAGE", "UNKNOWN_DATABASE", "UNKNOWN_SETTING", "UNKNOWN_DIRECTION_OF_SORTING",
        "UNKNOWN_AGGREGATE_FUNCTION", "UNKNOWN_FORMAT", "UNKNOWN_DATABASE_ENGINE",
        "UNKNOWN_TYPE_OF_QUERY", "UNKNOWN_ROLE"), 404),
    **dict.fromkeys(("UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED",
                     "SET_NON_GRANTED_ROLE"), 403),
    "REQUIRED_PASSWORD": 401, "HTTP_LENGTH_REQUIRED": 411, "QUERY_IS_TOO_LARGE": 413,
    "TIMEOUT_EXCEEDED": 408, "NOT_IMPLEMENTED": 501, "SOCKET_TIMEOUT": 503,
    "CANNOT_OPEN_FILE": 503, "CANNOT_SCHEDULE_TASK": 503,
}

BINARY_FORMATS = ("rowbinary", "native", "parquet", "arrow", "orc", "avro", "protobuf",
                  "capnproto", "msgpack", "bson", "npy", "rawblob")

# `INSERT INTO t [(cols)] [SETTINGS ...] FORMAT f` and where its data starts: after blanks and
# one line break, like the server's ParserInsertQuery. Matched on bytes: the data may be binary.
INSERT_RE = re.compile(
    rb"\s*INSERT\s+INTO\s+(?:TABLE\s+)?(?P<target>[^\s(]+\s*(?:\([^)]*\))?)\s*"
    rb"(?P<settings>SETTINGS\s.*?)?\s*FORMAT\s+(?P<format>\w+)[ \t\f]*(?:\r?\n)?",
    re.IGNORECASE | re.DOTALL)
OUTPUT_FORMAT_RE = re.compile(r"\bFORMAT\s+(\w+)\s*;?\s*$", re.IGNORECASE)
IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class ClickHouseError(Exception):
    """An error to answer as the server would: `Code: N. DB::Exception: ... (NAME)`."""

    def __init__(self, message):
        super().__init__(message)
        # chdb repeats the prefix for errors raised while reading INSERT data; the server doesn't.
        self.message = re.sub(r"^(Code: \d+\. DB::Exception: )\1+", r"\1", message.strip())
        code = re.match(r"Code: (\d+)\.", self.message)
        name = re.search(r"\((\w+)\)\s*$", self.message)
        self.code = int(code.group(1)) if code else 1001
        self.status = STATUS_BY_ERROR.get(name.group(1) if name else "", 500)

    @classmethod
    def of(cls, code, name, text):
        return cls(f"Code: {code}. DB::Exception: {text}. ({name})")


def quote_string(value):
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_identifier(value):
    return "`" + value.replace("\\", "\\\\").replace("`", "\\`") + "`"


def content_type(fmt):
    name = fmt.lower()
    if name.startswith(("tabseparated", "tsv")):
        return "text/tab-separated-values; charset=UTF-8"
    if name.startswith("csv"):
        return "text/csv; charset=UTF-8; header=absent"
    if name.startswith("json"):
        return "application/json; charset=UTF-8"
    if name.startswith(BINARY_FORMATS):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


def decompress_blocks(data):
    """Undoes ClickHouse's native block framing: per block a 16-byte checksum (not checked
    here), a method byte, u32 LE compressed size (counting the 9-byte header) and u32 LE
    uncompressed size, then the payload."""
    out, pos = bytearray(), 0
    while pos < len(data):
        if len(data) - pos < 25:
            raise ClickHouseError.of(271, "CANNOT_DECOMPRESS", "Truncated compressed block header")
        method = data[pos + 16]
        compressed = int.from_bytes(data[pos + 17:pos + 21], "little")
        size = int.from_bytes(data[pos + 21:pos + 25], "little")
        payload = data[pos + 25:pos + 16 + compressed]
        if compressed < 9 or len(payload) != compressed - 9:
            raise ClickHouseError.of(271, "CANNOT_DECOMPRESS", "Truncated compressed block")
        if method == 0x82:
            try:
                out += lz4.block.decompress(payload, uncompressed_size=size)
            except lz4.block.LZ4BlockError as error:
                raise ClickHouseError.of(271, "CANNOT_DECOMPRESS", str(error)) from None
        elif method == 0x02:
            out += payload
        else:
            raise ClickHouseError.of(
                271, "CANNOT_DECOMPRESS", f"Unknown compression method 0x{method:02x}")
        pos += 16 + compressed
    return bytes(out)


def parse_multipart(body, ctype):
    """Form fields of a multipart/form-data body; file parts (external tables) are skipped."""
    boundary = re.search(r'boundary="?([^";]+)"?', ctype)
    if not boundary:
        raise ClickHouseError.of(36, "BAD_ARGUMENTS", "multipart/form-data without boundary")
    fields = {}
    for part in body.split(b"--" + boundary.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, value = part.partition(b"\r\n\r\n")
        name = re.search(rb'[;\s]name="([^"]*)"', head)
        if name and b"filename=" not in head:
            fields[name.group(1).decode()] = value.removesuffix(b"\r\n").decode()
    return fields


class Engine:
    """One chdb session; queries take turns on a lock because the session is shared state."""

    def __init__(self, data_dir):
        self.session = chdb.session.Session(data_dir)
        self.lock = threading.Lock()

    def run(self, sql, fmt, database, settings, params):
        with self.lock:
            applied = []
            try:
                # Settings and the current database belong to the session, so each request
                # sets its own and puts the defaults back before the next one runs.
                if database:
                    self.session.query(f"USE {quote_identifier(database)}")
                for name, value in settings.items():
                    self.session.query(f"SET {name} = {quote_string(value)}")
                    applied.append(name)
                return self.session.query(sql, fmt, params=params or None)
            except RuntimeError as error:  # chdb's ChdbError
                raise ClickHouseError(str(error)) from None
            finally:
                if applied:
                    self.session.query("SET " + ", ".join(f"{n} = DEFAULT" for n in applied))
                if database:
                    self.session.query("USE default")

    def close(self):
        with self.lock:
            self.session.close()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every response carries Content-Length
    server_version = "chdb_server"
    engine: Engine
    user: str
    password: str

    def do_GET(self):
        self.serve()

    def do_POST(self):
        self.serve()

    def serve(self):
        query_id = str(uuid.uuid4())
        try:
            url = urlsplit(self.path)
            args = dict(parse_qsl(url.query, keep_blank_values=True))
            query_id = args.get("query_id") or query_id
            body = self.read_body()  # read before anything can fail, to keep the connection usable
            if url.path == "/ping" or (url.path == "/" and self.command == "GET"
                                       and "query" not in args):
                return self.reply(200, b"Ok.\n", {"Content-Type": "text/html; charset=UTF-8"})
            if url.path != "/":
                return self.reply(404, f"There is no handle {url.path}\n".encode(),
                                  {"Content-Type": "text/plain; charset=UTF-8"})
            self.authenticate(args)
            self.execute(args, body, query_id)
        except Exception as error:  # every failure is answered as a ClickHouse error
            if not isinstance(error, ClickHouseError):
                log.exception("unexpected failure")
                error = ClickHouseError.of(1001, "STD_EXCEPTION", str(error))
                self.close_connection = True  # the request may not have been read whole
            log.warning("query %s failed: %s", query_id, error.message)
            self.reply(error.status, error.message.encode() + b"\n", {
                "Content-Type": "text/plain; charset=UTF-8",
                "X-ClickHouse-Exception-Code": str(error.code),
                "X-ClickHouse-Query-Id": query_id,
            })

    def read_body(self):
        # http.server leaves Transfer-Encoding to us; the crate streams INSERT data chunked.
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailer fields, up to the empty line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def authenticate(self, args):
        user = self.headers.get("X-ClickHouse-User") or args.get("user")
        key = self.headers.get("X-ClickHouse-Key", args.get("password"))
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            basic_user, _, basic_key = base64.b64decode(auth[6:]).decode().partition(":")
            user, key = user or basic_user, basic_key if key is None else key
        user = user or "default"
        if user != self.user or not hmac.compare_digest((key or "").encode(),
                                                        self.password.encode()):
            raise ClickHouseError.of(516, "AUTHENTICATION_FAILED", f"{user}: Authentication "
                                     "failed: password is incorrect, or there is no user "
                                     "with such name")

    def execute(self, args, body, query_id):
        if args.get("decompress") == "1":
            body = decompress_blocks(body)
        ctype = self.headers.get("Content-Type", "")
        if ctype.startswith("multipart/form-data"):
            # The crate's `.param()`: SQL and param_* values travel as form fields.
            fields = parse_multipart(body, ctype)
            args = {**fields, **args} if "query" in args else {**args, **fields}
            body = b""
        # Like the server: the `query` parameter, a line break, then the body.
        text = (args["query"].encode() + b"\n" if args.get("query") else b"") + body
        if not text.strip():
            raise ClickHouseError.of(62, "SYNTAX_ERROR", "Empty query")
        params = {k[6:]: v for k, v in args.items() if k.startswith("param_")}
        settings = {k: v for k, v in args.items()
                    if k not in HTTP_ONLY and not k.startswith(("param_", "http_"))}
        for name in settings:
            if not IDENTIFIER_RE.match(name):
                raise ClickHouseError.of(115, "UNKNOWN_SETTING", f"Unknown setting '{name}'")
        fmt = args.get("default_format") or "TabSeparated"
        insert = INSERT_RE.match(text)
        if insert:
            result = self.insert(insert, text[insert.end():], args, settings, params, fmt)
        else:
            sql = text.decode()
            explicit = OUTPUT_FORMAT_RE.search(sql)
            fmt = explicit.group(1) if explicit else fmt
            result = self.engine.run(sql, fmt, args.get("database"), settings, params)
        data = result.bytes()
        summary = {
            "read_rows": result.rows_read(), "read_bytes": result.bytes_read(),
            "written_rows": result.rows_written(), "written_bytes": result.bytes_written(),
            "result_bytes": len(data), "elapsed_ns": int(result.elapsed() * 1e9),
        }
        self.reply(200, data, {
            "Content-Type": content_type(fmt),
            "X-ClickHouse-Format": fmt,
            "X-ClickHouse-Query-Id": query_id,
            "X-ClickHouse-Summary": json.dumps({k: str(v) for k, v in summary.items()},
                                               separators=(",", ":")),
        })

    def insert(self, match, data, args, settings, params, fmt):
        # chdb reads INSERT data from a file: `INSERT INTO t (cols) FROM INFILE ... FORMAT f`.
        with tempfile.NamedTemporaryFile(prefix="chdb-insert-", delete=False) as file:
            file.write(data)
        try:
            target, format_name = match["target"].decode(), match["format"].decode()
            extra = match["settings"].decode() if match["settings"] else ""
            sql = (f"INSERT INTO {target} FROM INFILE {quote_string(file.name)} {extra} "
                   f"FORMAT {format_name}")
            return self.engine.run(sql, fmt, args.get("database"), settings, params)
        finally:
            os.unlink(file.name)

    def reply(self, status, body, headers):
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--user", default="default")
    parser.add_argument("--password-file")
    opts = parser.parse_args()
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    password = ""
    if opts.password_file:
        with open(opts.password_file, encoding="utf-8") as file:
            password = file.read().rstrip("\r\n")
    os.makedirs(opts.data_dir, exist_ok=True)
    Handler.engine = Engine(opts.data_dir)
    Handler.user, Handler.password = opts.user, password

    server = ThreadingHTTPServer((opts.host, opts.port), Handler)

    def stop(*_):
        # shutdown() waits for serve_forever() to return, so it must run off the main thread.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"ready {opts.host}:{server.server_address[1]}", flush=True)
    log.info("serving %s on %s:%d", opts.data_dir, opts.host, server.server_address[1])
    server.serve_forever()
    server.server_close()
    Handler.engine.close()
    log.info("stopped")


if __name__ == "__main__":
    main()
