from tests.conftest import FINGERPRINT, balance, check_in, wait_finished


def test_generate_then_poll_to_completion(service, upstream):
    assert check_in(service) == 10
    answer = service.http.post(
        "/api/images/generate", json={"prompt": " hi ", "size": "16:9", "fingerprint": FINGERPRINT}
    )
    assert answer.status_code == 200, answer.text
    task = answer.json()["data"]
    assert task["remainingCredits"] == 9
    upstream.complete_task(task["id"])
    polled = wait_finished(service, task["id"])
    assert polled["status"] == "completed"
    image = service.http.get(polled["image"])
    assert image.status_code == 200
    assert balance(service) == 9
