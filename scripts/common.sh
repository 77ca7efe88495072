# Sourced by the scripts in this folder: where things are, and how to say what is happening.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VMCORE_VENV:-$ROOT/.venv}
export VIRTUAL_ENV=$VENV
export PATH="$VENV/bin:$HOME/.cargo/bin:$PATH"
export LUA_CPATH="$ROOT/target/lua/?.so;;"

say() { printf '\033[1m[vmcore]\033[0m %s\n' "$*" >&2; }

kvm_status() {
    if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
        echo "KVM: /dev/kvm is usable; guest tests RUN"
    else
        echo "KVM: WARNING /dev/kvm is absent or not accessible; every guest test is SKIPPED"
    fi
}
