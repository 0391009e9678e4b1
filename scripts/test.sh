#!/usr/bin/env bash
# The project's test command (README "Testing"; .ci/run calls it).
# Needs a RabbitMQ at 127.0.0.1:5672 (guest/guest): starts an installed one that is
# stopped, installs one with apt-get when missing, or fails with one clear line.
# (No PostgreSQL yet: the shared PostgreSQL outbox is not in this release; the
# config only knows its key.)
set -euo pipefail
cd "$(dirname "$0")/.."

broker_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

ensure_rabbitmq() {
  if broker_up; then return 0; fi
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "test.sh: installing rabbitmq-server with apt-get…"
      if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null; }; then
        echo "error: RabbitMQ is not running at 127.0.0.1:5672 and apt-get could not install rabbitmq-server" >&2
        exit 1
      fi
    else
      echo "error: RabbitMQ is not running at 127.0.0.1:5672 and cannot be installed here (needs root and apt-get); start one and re-run" >&2
      exit 1
    fi
  fi
  broker_up && return 0
  echo "test.sh: starting rabbitmq-server…"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 120); do
    if broker_up; then
      command -v rabbitmqctl >/dev/null 2>&1 && timeout 60 rabbitmqctl -q await_startup >/dev/null 2>&1 || true
      return 0
    fi
    sleep 1
  done
  echo "error: rabbitmq-server was started but nothing answers at 127.0.0.1:5672 after 120 s" >&2
  exit 1
}

ensure_rabbitmq
echo "test.sh: RabbitMQ answers at 127.0.0.1:5672"
bash scripts/check-links.sh

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
# The deterministic simulation of the engine prints its summary line
# ("simulation: N scenarios, 0 invariant violations"); a failure prints the seed
# and the command that replays it.
cargo test --locked --test simulation -- --nocapture
cargo test --locked -- --test-threads 4 --skip simulation
bash deploy/check.sh
echo "test.sh: all checks passed"
