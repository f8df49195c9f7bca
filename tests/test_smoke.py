import json

import pytest


@pytest.mark.gen_test(timeout=10)
async def test_ws_json_frames_from_sim(sim, api, ws_connect):
    created = await api.create_session()
    conn = await ws_connect(f"/stream/{created['sessionId']}")
    first = json.loads(await conn.read_message())
    assert first == {"type": "status", "message": "\u2705 Connected to video stream proxy"}
    kinds = []
    for _ in range(10):
        msg = json.loads(await conn.read_message())
        kinds.append(msg["type"])
    assert "frame" in kinds
