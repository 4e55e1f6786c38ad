"""Fuzzing every endpoint from the OpenAPI schema (schemathesis): no input gets a 5xx.

Bounded here (a fixed number of valid and invalid cases per operation, derandomised);
``benchmarks/serve_fuzz.py`` runs the schemathesis command line against a live server
and reports the number of cases.
"""

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from skcarrot.serve import Settings, create_app  # noqa: E402

CASES_PER_OPERATION_AND_MODE = 20


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    db = tmp_path_factory.mktemp("fuzz") / "ledger.db"
    app = create_app(Settings(db_url=f"sqlite:///{db}", max_body_bytes=1_000_000))
    _, key = app.state.server.ledger.create_key("fuzzer", budget=10**9)
    return app, key


def test_no_input_gets_a_server_error(served):
    app, key = served
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 9
    statuses = []
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=CASES_PER_OPERATION_AND_MODE, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def fuzz(case):
                response = case.call(headers={"Authorization": f"Bearer {key}"})
                statuses.append(response.status_code)
                case.validate_response(response, checks=[not_a_server_error])

            try:
                fuzz()
            except Unsatisfiable:
                # no invalid request exists for an operation without inputs (GET /v1/health)
                assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    assert len(statuses) >= 9 * CASES_PER_OPERATION_AND_MODE
    assert all(code < 500 for code in statuses)
