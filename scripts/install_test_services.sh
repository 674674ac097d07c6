#!/usr/bin/env bash
# Test setup, best effort: the PostgreSQL server for the many-workers test and headless Chromium for the
# dashboard test.
# Tests that need one of them skip with a clear reason where it could not be installed (no root, no apt).
set -u
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)

[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing test services: ${need[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}") \
    >/tmp/compactmind-test-services.log 2>&1 || echo "could not install ${need[*]}; see /tmp/compactmind-test-services.log"
else
  echo "not root or no apt-get: ${need[*]} not installed; the tests that need them will skip"
fi
exit 0
