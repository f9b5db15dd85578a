#!/usr/bin/env bash
# The tests of DB mode talk to a real PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`).
# CI machines run one; on a machine without it, install Debian's and start it that way.
set -euo pipefail
ready() { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; }
ready && exit 0
export DEBIAN_FRONTEND=noninteractive
command -v pg_ctlcluster >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq postgresql; }
version=$(ls /etc/postgresql | sort -V | tail -n 1)
hba=/etc/postgresql/$version/main/pg_hba.conf
grep -q "^host all all 127.0.0.1/32 trust" "$hba" || sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
pg_ctlcluster --skip-systemctl-redirect "$version" main start || pg_ctlcluster --skip-systemctl-redirect "$version" main reload
for _ in $(seq 1 30); do ready && break; sleep 1; done
su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='test'\"" | grep -q 1 || su postgres -c "createdb test"
ready
