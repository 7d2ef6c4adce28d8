#!/usr/bin/env bash
# What only the tests need from the system: a headless Chromium, which renders the
# `dvc plots show` page with the network blocked (tests/test_pipeline.py). Installed with
# apt-get when we are root on Debian/Ubuntu; otherwise says how, and that test is skipped.
set -euo pipefail
command -v chromium >/dev/null || command -v chromium-browser >/dev/null && exit 0
[ "$(uname -s)" = "Linux" ] || { echo "[setup] no chromium: the offline plots test will be skipped"; exit 0; }
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
  echo "[setup] installing chromium (headless, for the offline plots test) with apt-get"
  apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
else
  echo "[setup] no chromium: the offline plots test will be skipped (Debian/Ubuntu: sudo apt-get install chromium)"
fi
