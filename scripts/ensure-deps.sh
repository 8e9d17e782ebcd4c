#!/usr/bin/env bash
# Installs what building and testing tower-lease-lock needs, only when missing:
# protoc (etcd-client's build script), etcd (tests, demo), etcdctl (interop
# tests), procps (kill), curl (the README's quick start, run by a test) and
# python3 (scripts/check-msrv, CI); and each command named as an argument
# (its Debian package of the same name), e.g. `ensure-deps.sh npm`. Uses apt-get (through sudo when not
# root); elsewhere it says what to install and fails.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install a Rust toolchain (https://rustup.rs)" >&2
  exit 1
fi

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
# A kill binary for the tests that pause etcd (SIGSTOP) and stop processes by pid.
if ! { [ -x /bin/kill ] || [ -x /usr/bin/kill ]; }; then
  missing+=(procps)
fi
for extra in "$@"; do
  command -v "$extra" >/dev/null 2>&1 || missing+=("$extra")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: missing ${missing[*]} (Debian package names)." >&2
  echo "Install them (protoc, etcd 3.4+, etcdctl, curl, python3; npm for the emulators) with your package manager, then retry." >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "error: need root or sudo to install ${missing[*]}" >&2
    exit 1
  fi
  sudo="sudo"
fi
echo "installing ${missing[*]} with apt-get" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
