"""certyo-relay's Prometheus metrics (`run --metrics-addr`): what a scraper reads while the relay
delivers, fails, rides out an outage and holds the lease. Fixtures in conftest.py."""
import re
import urllib.error
import urllib.request

from harness import free_port, wait_for  # pg_test/, on the path by conftest.py


def scrape(port):
    """{(name, labels text): value} of every sample at /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        assert answer.headers["Content-Type"].startswith("application/openmetrics-text"), answer.headers
        text = answer.read().decode()
    assert text.endswith("# EOF\n"), text[-200:]
    samples = {}
    for line in text.splitlines():
        found = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if found:
            samples[(found[1], found[2] or "")] = float(found[3])
    return samples


def value(port, name, **labels):
    wanted = ",".join(f'{k}="{v}"' for k, v in ({"source": "shop"} | labels).items())
    return scrape(port).get((name, wanted))


def test_metrics_count_deliveries_dead_letters_outages_and_the_queue(shop, emulator, relay):
    port = free_port()
    r = relay().start("--metrics-addr", f"127.0.0.1:{port}")
    assert wait_for(lambda: r.output().count("serving metrics") == 1, timeout=10), r.output()
    assert wait_for(lambda: value(port, "certyo_relay_lease_held") == 1, timeout=10)
    assert value(port, "certyo_relay_records_total", fate="delivered") == 0
    assert value(port, "certyo_relay_last_success_timestamp_seconds") == 0
    assert value(port, "certyo_relay_outage") == 0 and value(port, "certyo_relay_source_up") == 1

    emulator.fault("reject", times=1)
    shop.sql("INSERT INTO products (id, name, price) VALUES (1, 'dead', 1)")
    assert wait_for(shop.drained, timeout=15), shop.queue()
    shop.sql("INSERT INTO products (id, name, price) VALUES " + ", ".join(f"({i}, 'p{i}', 1)" for i in range(2, 7)))
    assert wait_for(shop.drained, timeout=15), shop.queue()
    assert wait_for(lambda: value(port, "certyo_relay_records_total", fate="delivered") == 5, timeout=10)
    assert value(port, "certyo_relay_records_total", fate="dead") == 1
    assert value(port, "certyo_relay_answers_total", answer="accepted", status="202") == 5
    assert value(port, "certyo_relay_answers_total", answer="rejected", status="422") == 1
    assert value(port, "certyo_relay_batch_duration_seconds_count") >= 2
    assert value(port, "certyo_relay_last_batch_duration_seconds") > 0
    assert value(port, "certyo_relay_last_success_timestamp_seconds") > 1e9
    # The queue's counts are read every 10 s while metrics are served.
    assert wait_for(lambda: (value(port, "certyo_relay_queue_changes", state="dead"),
                             value(port, "certyo_relay_queue_changes", state="pending")) == (1, 0), timeout=20)
    assert wait_for(lambda: value(port, "certyo_relay_anchored_total") == 5, timeout=20)

    # An outage: on while Certyo does not answer, off once it does again.
    emulator.fault("500", times=4)
    shop.sql("INSERT INTO products (id, name, price) VALUES " + ", ".join(f"({i}, 'p{i}', 1)" for i in range(7, 20)))
    assert wait_for(lambda: value(port, "certyo_relay_outage") == 1, timeout=15, every=0.05)
    assert wait_for(lambda: shop.drained() and value(port, "certyo_relay_outage") == 0, timeout=30)
    assert value(port, "certyo_relay_records_total", fate="retried") >= 1
    assert value(port, "certyo_relay_answers_total", answer="transient", status="") >= 1

    # Anything but GET /metrics is refused.
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        raise AssertionError("/ answered")
    except urllib.error.HTTPError as e:
        assert e.code == 404
    r.stop()


def test_an_address_in_use_is_a_configuration_error(shop, emulator, relay):
    port = free_port()
    r = relay().start("--metrics-addr", f"127.0.0.1:{port}")
    assert wait_for(lambda: "serving metrics" in r.output(), timeout=10), r.output()
    second = relay()
    done = second.command("run", "--metrics-addr", f"127.0.0.1:{port}")
    assert done.returncode == 2 and f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr, done.stderr
    r.stop()
