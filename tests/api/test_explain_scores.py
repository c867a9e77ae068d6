"""Faithfulness scores over HTTP: asked for with ``scores``, returned in every explanation."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app


def test_each_explanation_carries_the_scores_asked_for(client: TestClient, png: bytes) -> None:
    response = client.post(
        "/v1/models/tiny/explain",
        files=[("image", ("a.png", png, "image/png"))],
        data={
            "layer": ["layer4", "layer3"],
            "top_k": "2",
            "scores": ["confidence_change", "drop", "increase", "road", "drop"],
            "road_percentiles": ["50"],
            "overlay": "none",
        },
    )
    assert response.status_code == 200, response.text
    explanations = response.json()["results"][0]["explanations"]
    assert len(explanations) == 4
    for explanation in explanations:
        scores = explanation["scores"]
        assert set(scores) == {"confidence_change", "drop", "increase", "road"}
        p = explanation["target"]["probability"]
        change = scores["confidence_change"]
        assert -1.0 <= change <= 1.0
        assert scores["increase"] == (1.0 if change > 0 else 0.0)
        assert scores["drop"] == pytest.approx(max(0.0, -change) / p, rel=1e-6, abs=1e-9)
        assert -0.5 <= scores["road"] <= 0.5


def test_scores_in_a_json_body_and_none_asked_for_is_null(client: TestClient, png: bytes) -> None:
    image = {"data": base64.b64encode(png).decode("ascii")}
    asked = client.post(
        "/v1/models/tiny/explain",
        json={"images": [image], "scores": "insertion", "curve_step": 0.25, "overlay": "none"},
    )
    assert asked.status_code == 200, asked.text
    (explanation,) = asked.json()["results"][0]["explanations"]
    assert list(explanation["scores"]) == ["insertion"]
    assert 0.0 <= explanation["scores"]["insertion"] <= 1.0
    plain = client.post("/v1/models/tiny/explain", json={"images": [image], "overlay": "none"})
    assert plain.status_code == 200, plain.text
    assert plain.json()["results"][0]["explanations"][0]["scores"] is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("scores", "pointing_game"), ("road_percentiles", "100"), ("curve_step", "0.01")],
)
def test_score_parameters_outside_their_ranges_are_refused(
    client: TestClient, png: bytes, field: str, value: str
) -> None:
    response = client.post(
        "/v1/models/tiny/explain",
        files=[("image", ("a.png", png, "image/png"))],
        data={"scores": "road", field: value},
    )
    assert response.status_code == 422, response.text
    assert field in response.text


def test_no_road_percentiles_means_the_default_ones_in_json_as_in_a_form(
    client: TestClient, png: bytes
) -> None:
    """A form can only leave a repeatable field out; an empty JSON list says the same."""
    image = {"data": base64.b64encode(png).decode("ascii")}
    body = {"images": [image], "scores": "road", "overlay": "none"}
    explicit = client.post(
        "/v1/models/tiny/explain", json={**body, "road_percentiles": [20, 40, 60, 80]}
    )
    empty = client.post("/v1/models/tiny/explain", json={**body, "road_percentiles": []})
    form = client.post(
        "/v1/models/tiny/explain",
        files=[("image", ("a.png", png, "image/png"))],
        data={"scores": "road", "overlay": "none"},
    )
    scores = [
        response.json()["results"][0]["explanations"][0]["scores"]["road"]
        for response in (explicit, empty, form)
    ]
    assert scores[0] == scores[1] == scores[2]  # the same percentiles and the same seeded noise


@pytest.fixture(scope="module")
def capped_client(
    settings_factory: Callable[..., Any], tiny_spec: Any, until_ready: Callable[..., None]
) -> Iterator[TestClient]:
    settings = settings_factory(
        models=[tiny_spec], score_max_forward_passes=100, score_max_road_solves=16
    )
    with TestClient(create_app(settings)) as client:
        until_ready(client)
        yield client


def test_scores_past_the_cost_cap_are_refused_before_any_work_naming_the_cost(
    capped_client: TestClient, png: bytes
) -> None:
    # 2 targets x (1 + 19 + 19) passes + 1 blurred copy = 79: within 100.
    within = capped_client.post(
        "/v1/models/tiny/explain",
        files=[("image", ("a.png", png, "image/png"))],
        data={"scores": ["drop", "deletion", "insertion"], "top_k": "2", "overlay": "none"},
    )
    assert within.status_code == 200, within.text
    # 3 targets: 118 passes.
    past = capped_client.post(
        "/v1/models/tiny/explain",
        files=[("image", ("a.png", png, "image/png"))],
        data={"scores": ["drop", "deletion", "insertion"], "top_k": "3", "overlay": "none"},
    )
    assert past.status_code == 422, past.text
    problem = past.json()
    assert problem["code"] == "scores_too_costly"
    assert "118 forward passes" in problem["detail"]
    assert "the limit is 100" in problem["detail"]


def test_road_past_its_solve_cap_is_refused_naming_the_imputations(
    capped_client: TestClient, png: bytes
) -> None:
    def explain(top_k: int) -> Any:
        return capped_client.post(
            "/v1/models/tiny/explain",
            files=[("image", ("a.png", png, "image/png"))],
            data={"scores": "road", "top_k": str(top_k), "overlay": "none"},
        )

    assert explain(2).status_code == 200  # 2 maps x 8 solves: the cap
    past = explain(3)
    assert past.status_code == 422, past.text
    assert past.json()["code"] == "scores_too_costly"
    assert "24 imputations" in past.json()["detail"]
