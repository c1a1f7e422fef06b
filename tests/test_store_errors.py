"""A store's error read from an exception's chain (pipeline/store_errors.py): the one line the CLI prints,
and the sweep parent's ride through a store that does not answer for a while (a chaos review: a 10-15 s
PostgreSQL outage, or a tracking server's restart, ended the sweep with a 37-100 line traceback)."""

from __future__ import annotations

import io
import sqlite3

import pytest

from pipeline.store_errors import Outage, store_locked, store_unreachable


class OperationalError(Exception):  # the class name psycopg2 and SQLAlchemy use; only words are read
    pass


class StorageInternalError(Exception):
    pass


def chained(outer: Exception, inner: Exception) -> Exception:
    try:
        try:
            raise inner
        except Exception as e:
            raise outer from e
    except Exception as e:
        return e


PG_DOWN = OperationalError(
    'connection to server at "127.0.0.1", port 5599 failed: Connection refused\n\tIs the server running?'
)


def test_what_a_store_that_went_away_says_and_what_it_does_not():
    optuna = chained(StorageInternalError("An exception is raised during the commit."), PG_DOWN)
    assert (
        store_unreachable(optuna)
        == 'connection to server at "127.0.0.1", port 5599 failed: Connection refused'
    )

    class ConnectionError(OSError):  # requests': MLflow's REST client to a server that is down
        pass

    rest = chained(RuntimeError("API request to http://127.0.0.1:5733/api/2.0/mlflow/runs/get failed"),
                   ConnectionError("HTTPConnectionPool(host='127.0.0.1', port=5733): Max retries exceeded"))  # fmt: skip
    assert store_unreachable(rest).startswith("HTTPConnectionPool(host='127.0.0.1', port=5733)")
    # not an outage: a schema error of the same class, a locked sqlite file (its own line), a bug
    assert store_unreachable(OperationalError("no such table: runs")) is None
    locked = chained(
        OperationalError("(sqlite3.OperationalError) database is locked"),
        sqlite3.OperationalError("database is locked"),
    )
    assert store_locked(locked) == "database is locked" and store_unreachable(locked) is None
    assert store_unreachable(ZeroDivisionError("division by zero")) is None


def test_the_parent_rides_out_a_store_that_does_not_answer_then_gives_up():
    now = [0.0]
    out = io.StringIO()
    outage = Outage(out, limit_s=60, clock=lambda: now[0])
    calls = []

    def down():
        calls.append(now[0])
        raise chained(StorageInternalError("commit failed"), PG_DOWN)

    for t in (0.0, 1.0, 30.0):  # the workers go on; the parent says so once
        now[0] = t
        assert outage.call(down, default="waiting") == "waiting"
    assert out.getvalue().count("a store did not answer (connection to server at") == 1
    now[0] = 31.0
    assert outage.call(lambda: 7) == 7 and "the store answers again (after 31 s)" in out.getvalue()
    for t in (40.0, 100.0):  # a new outage counts from its own start
        now[0] = t
        assert outage.call(down) is None
    now[0] = 100.5
    with pytest.raises(StorageInternalError):
        outage.call(down)  # 60.5 s of silence: beyond the limit, the error goes to the CLI's one line
    with pytest.raises(ZeroDivisionError):  # not a store's error: never swallowed
        Outage(out).call(lambda: 1 / 0)


@pytest.mark.parametrize(("verb", "code"), [("sweep", 1), ("train", 1), ("regress", 2)])
def test_a_store_that_did_not_answer_is_one_line(verb, code):
    from pipeline.cli import store_error

    line, got = store_error(chained(StorageInternalError("commit failed"), PG_DOWN), verb)
    assert got == code and "\n" not in line
    assert line.startswith('error: a store did not answer (connection to server at "127.0.0.1", port 5599')
    assert store_error(ZeroDivisionError(), verb) is None


def test_a_tracking_server_down_is_an_outage_and_one_answering_500_is_not(monkeypatch):
    """Real MLflow client errors. A closed port: urllib3's "Max retries exceeded", named without its URL
    so that its cause fits the line. A server answering every request with 500 raises the same class
    and words ("too many 500 error responses"), but it answered: no outage to wait 10 minutes for (a
    review found the sweep's parent would)."""
    import http.server
    import socket
    import threading

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(Exception, match="API request") as down:
        MlflowClient(f"http://127.0.0.1:{closed}").get_run("0" * 32)
    said = store_unreachable(down.value)
    assert (
        said
        == f"HTTPConnection(host='127.0.0.1', port={closed}): Failed to establish a new connection: [Errno 111] Connection refused"
    ), said

    class Fails(http.server.BaseHTTPRequestHandler):
        code = 500

        def do_GET(self):
            self.send_response(self.code)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error_code": "INTERNAL_ERROR", "message": "boom"}')

        def log_message(self, *a):
            pass

    def answering(code: int) -> BaseException:
        Fails.code = code
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fails)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            with pytest.raises(Exception, match="API request") as failing:
                MlflowClient(f"http://127.0.0.1:{srv.server_port}").get_run("0" * 32)
        finally:
            srv.shutdown()
        return failing.value

    assert store_unreachable(answering(500)) is None
    # a proxy in front of a server that restarts answers 502 / 503 / 504 for it: the server did not answer
    for code in (502, 503, 504):
        said = store_unreachable(answering(code))
        assert said is not None and f"too many {code} error responses" in said, (code, said)
