#!/usr/bin/env bash
# The project's test command (README "Testing"; .ci/run calls it).
# Needs two servers on this machine and a browser, and for each one: uses it when
# it answers (is installed), starts an installed server that is stopped, installs
# it with apt-get when missing (as root), or fails with one clear line:
#   - RabbitMQ at 127.0.0.1:5672 (guest/guest);
#   - PostgreSQL at 127.0.0.1:5432 where user postgres logs in without a password
#     (`psql "postgres://postgres@127.0.0.1:5432/postgres"`), for the tests of the
#     shared PostgreSQL outbox. A freshly installed Debian server asks TCP clients
#     for a password; as root the script then puts
#     `host all postgres 127.0.0.1/32 trust` at the top of its pg_hba.conf (that
#     one user, loopback only) and reloads it.
#   - Chromium and its WebDriver (Debian's chromium and chromium-driver:
#     /usr/bin/chromium, /usr/bin/chromedriver; CHROMIUM / CHROMEDRIVER name others),
#     for the operator console's tests in a real headless browser.
# The tests read the PostgreSQL URL from MIDAS_TEST_PG_URL; it is exported as the
# URL above unless already set. When it is set, the script only checks that psql can
# log in with it and leaves the local server alone.
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

# --- PostgreSQL (the shared outbox's tests) -----------------------------------------
pg_port=5432
pg_default_url="postgres://postgres@127.0.0.1:${pg_port}/postgres"

pg_up() { (exec 3<>"/dev/tcp/127.0.0.1/${pg_port}") 2>/dev/null; }
# Server binaries of any installed major version (Debian layout) or pg_ctlcluster.
pg_installed() {
  command -v pg_ctlcluster >/dev/null 2>&1 && return 0
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}
# psql as user postgres over TCP, never prompting for a password. Prints psql's
# output (stderr included); the status is psql's.
pg_login() {
  env -u PGPASSWORD PGPASSFILE=/nonexistent/midas-worker-test.pgpass PGCONNECT_TIMEOUT=5 \
    psql -w -X -q -tA "$1" -c 'select 1' </dev/null 2>&1
}
# The line of psql's output that says what went wrong.
pg_why() { grep -m1 -E 'FATAL|error' <<<"$1" || head -n1 <<<"$1"; }
# psql as the postgres system user over the local socket (peer auth on Debian).
pg_as_postgres() {
  local sql=$1
  if command -v runuser >/dev/null 2>&1; then
    runuser -u postgres -- psql -X -q -tA -p "$pg_port" -c "$sql" </dev/null
  else
    su postgres -s /bin/sh -c "psql -X -q -tA -p $pg_port -c \"$sql\"" </dev/null
  fi
}
pg_fail() { echo "error: $*" >&2; exit 1; }

pg_start() {
  local started="" out
  if command -v pg_lsclusters >/dev/null 2>&1 && command -v pg_ctlcluster >/dev/null 2>&1; then
    local ver name port _rest
    while read -r ver name port _rest; do
      [ "$port" = "$pg_port" ] || continue
      echo "test.sh: starting PostgreSQL cluster $ver/$name (pg_ctlcluster)…"
      if ! out=$(pg_ctlcluster "$ver" "$name" start 2>&1) && ! pg_up; then
        if [ "$(id -u)" != 0 ]; then
          pg_fail "PostgreSQL $ver/$name is installed but stopped, and starting it needs root (sudo pg_ctlcluster $ver $name start); start it and re-run"
        fi
        pg_fail "pg_ctlcluster $ver $name start failed: $(grep -v '^$' <<<"$out" | head -n1)"
      fi
      started=1
    done < <(pg_lsclusters -h 2>/dev/null || true)
    if [ -z "$started" ] && [ -z "$(pg_lsclusters -h 2>/dev/null || true)" ] &&
      [ "$(id -u)" = 0 ] && command -v pg_createcluster >/dev/null 2>&1; then
      # Installed without a cluster (e.g. deleted): create the default one.
      ver=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -n | tail -n1)
      if [ -n "$ver" ]; then
        echo "test.sh: creating PostgreSQL cluster $ver/main on port $pg_port…"
        pg_createcluster "$ver" main --port "$pg_port" --start >/dev/null 2>&1 || true
        started=1
      fi
    fi
  fi
  if [ -z "$started" ] && command -v service >/dev/null 2>&1; then
    echo "test.sh: starting PostgreSQL (service postgresql start)…"
    if ! service postgresql start >/dev/null 2>&1 && [ "$(id -u)" != 0 ]; then
      pg_fail "PostgreSQL is installed but not running at 127.0.0.1:${pg_port}, and starting it needs root (sudo service postgresql start); start it and re-run"
    fi
    started=1
  fi
  [ -n "$started" ] || pg_fail "PostgreSQL is installed but not running at 127.0.0.1:${pg_port}, and this script does not know how to start it here (no pg_ctlcluster cluster on port ${pg_port}, no service); start it and re-run"
  for _ in $(seq 1 60); do
    pg_up && return 0
    sleep 1
  done
  if [ "$(id -u)" != 0 ]; then
    pg_fail "PostgreSQL is installed but not running at 127.0.0.1:${pg_port}, and starting it needs root (sudo pg_ctlcluster <version> main start); start it and re-run"
  fi
  pg_fail "PostgreSQL was started but nothing answers at 127.0.0.1:${pg_port} after 60 s (see /var/log/postgresql/)"
}

# Lets user postgres in over TCP from 127.0.0.1 without a password (test server only).
pg_trust_loopback() {
  local hba
  hba=$(pg_as_postgres 'show hba_file' 2>/dev/null) || hba=""
  [ -n "$hba" ] && [ -f "$hba" ] || return 1
  if ! grep -qE '^host[[:space:]]+all[[:space:]]+postgres[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
    echo "test.sh: allowing passwordless TCP login for user postgres from 127.0.0.1 in $hba"
    local tmp
    tmp=$(mktemp) || return 1
    { echo "host all postgres 127.0.0.1/32 trust   # added by midas-worker scripts/test.sh"
      cat "$hba"; } >"$tmp" && cat "$tmp" >"$hba"   # cat keeps the file's owner and mode
    rm -f "$tmp"
  fi
  pg_as_postgres 'select pg_reload_conf()' >/dev/null 2>&1
}

ensure_postgres() {
  if [ -n "${MIDAS_TEST_PG_URL:-}" ]; then
    # Tests pointed at a server of the caller's choosing: check it, manage nothing.
    command -v psql >/dev/null 2>&1 ||
      pg_fail "MIDAS_TEST_PG_URL is set but psql is not installed to check it (apt-get install postgresql-client)"
    local out
    out=$(pg_login "$MIDAS_TEST_PG_URL") ||
      pg_fail "MIDAS_TEST_PG_URL does not let psql log in: $(pg_why "$out")"
    return 0
  fi
  if ! command -v psql >/dev/null 2>&1 || { ! pg_up && ! pg_installed; }; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "test.sh: installing postgresql with apt-get…"
      if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }; then
        pg_fail "PostgreSQL is not usable at 127.0.0.1:${pg_port} and apt-get could not install postgresql"
      fi
    else
      pg_fail "PostgreSQL (server and psql) is needed at 127.0.0.1:${pg_port} and cannot be installed here (needs root and apt-get); install and start one, or set MIDAS_TEST_PG_URL, and re-run"
    fi
  fi
  pg_up || pg_start
  local out="" i
  # A server that has just started may still refuse logins for a moment.
  for i in $(seq 1 10); do
    if out=$(pg_login "$pg_default_url"); then
      export MIDAS_TEST_PG_URL="$pg_default_url"
      return 0
    fi
    grep -qiE 'starting up|shutting down|recovery' <<<"$out" || break
    sleep 1
  done
  if grep -qiE 'authentication failed|no password supplied|pg_hba\.conf' <<<"$out"; then
    if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1 && pg_trust_loopback &&
      out=$(pg_login "$pg_default_url"); then
      export MIDAS_TEST_PG_URL="$pg_default_url"
      return 0
    fi
    pg_fail "PostgreSQL at 127.0.0.1:${pg_port} wants a password from user postgres: put 'host all postgres 127.0.0.1/32 trust' at the top of its pg_hba.conf (psql -tAc 'show hba_file') and reload, or set MIDAS_TEST_PG_URL; psql said: $(pg_why "$out")"
  fi
  pg_fail "psql cannot log in to PostgreSQL at 127.0.0.1:${pg_port} as postgres: $(pg_why "$out")"
}
# --- end PostgreSQL -------------------------------------------------------------------

# --- Chromium (the console's browser tests) -------------------------------------------
ensure_chromium() {
  local browser=${CHROMIUM:-/usr/bin/chromium} driver=${CHROMEDRIVER:-/usr/bin/chromedriver}
  if [ -x "$browser" ] && [ -x "$driver" ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: installing chromium and chromium-driver with apt-get…"
    if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } &&
      [ -x "$browser" ] && [ -x "$driver" ]; then
      return 0
    fi
    echo "error: the console's browser tests need $browser and $driver, and apt-get could not install chromium chromium-driver" >&2
    exit 1
  fi
  echo "error: the console's browser tests need $browser and $driver (Debian: apt-get install chromium chromium-driver; needs root here), or CHROMIUM/CHROMEDRIVER naming them" >&2
  exit 1
}

ensure_rabbitmq
echo "test.sh: RabbitMQ answers at 127.0.0.1:5672"
ensure_postgres
echo "test.sh: PostgreSQL answers at $(sed -E 's#(://[^:/@]*:)[^@/]*@#\1***@#' <<<"$MIDAS_TEST_PG_URL") (MIDAS_TEST_PG_URL)"
ensure_chromium
echo "test.sh: $("${CHROMEDRIVER:-/usr/bin/chromedriver}" --version | head -n1)"
bash scripts/check-links.sh

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
# The deterministic simulation of the engine prints its summary line
# ("simulation: N scenarios, 0 invariant violations"); a failure prints the seed
# and the command that replays it. The system simulation (2-3 workers on one
# shared model outbox) prints
# "system simulation: N scenarios (2-3 workers), 0 invariant violations".
# A SIM_SEED/SIM_SCENARIOS left in the caller's environment would shrink both runs
# silently: the full run ignores them (replay a seed by hand with the command a
# failure prints).
unset SIM_SEED SIM_SCENARIOS
cargo test --locked --test simulation -- --nocapture
cargo test --locked --test system_simulation -- --nocapture
# At most two tests at a time: the machine this runs on may have two cores, and a
# starved scheduler turns a test's definitive Midas answer into a timeout.
cargo test --locked -- --test-threads 2 --skip simulation --skip lease_rule::
# The lease rule at its minimum lease (tests/it/lease_rule.rs) holds when renewals
# come on time; a worker starved of CPU by the tests running beside it renews late
# (which no lease rule can cover), so it runs alone.
cargo test --locked --test it -- --test-threads 1 lease_rule::
bash deploy/check.sh
echo "test.sh: all checks passed"
