#!/bin/bash
# zest node installer: the init container of the zest DaemonSet runs it on every node.
#
# It installs zest on the host and runs it under the host's systemd, so that
# `zest serve` outlives the pod (and its FUSE mounts outlive pod restarts):
#   1. copies the image's /usr/bin/zest to the host's /usr/local/bin/zest, the unit to
#      /etc/systemd/system/zest.service and the ConfigMap's config.toml to
#      /etc/zest/config.toml (each only when it differs, atomically);
#   2. enables zest.service and starts it, or restarts it when something changed
#      (a restart hands the FUSE connections to the new process: mounts stay alive);
#   3. waits until zest's socket exists;
#   4. points containerd at zest, only if its configuration has no [proxy_plugins.zest]
#      yet: the edited file is checked by the host's own containerd (`config dump`)
#      before it replaces the old one (kept as config.toml.zest-backup), and containerd
#      is restarted once. A configuration it cannot edit safely is left alone and the
#      container fails with what to do by hand.
#
# The host's filesystem is mounted at $ZEST_HOST_ROOT (default /host); commands run
# on the host through nsenter into PID 1's namespaces (the pod has hostPID).
# $ZEST_CONTAINERD_CONFIG and $ZEST_CONTAINERD_UNIT name containerd's configuration
# file and systemd unit on the host (default /etc/containerd/config.toml and
# containerd.service).
#
#   install.sh                               the installation above
#   install.sh merge-containerd-config FILE  step 4 alone, on FILE, checked with the
#                                            containerd on PATH, no restart (for tests)
set -euo pipefail

host=${ZEST_HOST_ROOT:-/host}
files=${ZEST_FILES:-/usr/share/zest}
config_source=${ZEST_CONFIG_SOURCE:-/etc/zest-config/config.toml}
# containerd as a systemd unit reading this file (kubeadm-style nodes); distributions
# that template their own containerd configuration need these changed.
containerd_config=${ZEST_CONTAINERD_CONFIG:-/etc/containerd/config.toml}
containerd_unit=${ZEST_CONTAINERD_UNIT:-containerd.service}

log() { echo "zest-installer: $*" >&2; }
die() { log "error: $*"; exit 1; }
on_host() { nsenter --target 1 --mount --uts --ipc --net --pid -- "$@"; }

# The snapshotter socket named by a config.toml (its [snapshotter] socket key).
socket_of() {
  awk '
    /^[[:space:]]*\[/ { section = $0; gsub(/[[:space:]]/, "", section) }
    section == "[snapshotter]" && /^[[:space:]]*socket[[:space:]]*=/ {
      sub(/^[^=]*=[[:space:]]*"/, ""); sub(/".*$/, ""); print; exit
    }' "$1"
}

# Copies $1 to $2 with mode $3 when the content differs; returns 0 when it copied.
install_file() {
  local src=$1 dst=$2 mode=$3
  if [ -f "$dst" ] && cmp -s "$src" "$dst"; then
    return 1
  fi
  # Called as a condition, where set -e does not apply: every step checks itself.
  mkdir -p "$(dirname "$dst")" || die "cannot create $(dirname "$dst")"
  { cp "$src" "$dst.zest-new" && chmod "$mode" "$dst.zest-new"; } || die "cannot write $dst.zest-new"
  # rename(2): a running binary is replaced without "text file busy".
  mv -f "$dst.zest-new" "$dst" || die "cannot replace $dst"
  log "installed $dst"
}

# Sets `key = value` in the TOML table whose header line is exactly $table (replacing
# that key if the table has it), or appends the table; then appends the proxy plugin.
# Reads $1, writes stdout.
edit_containerd_config() {
  local file=$1 table=$2 socket=$3
  awk -v table="$table" -v socket="$socket" '
    function keys() {
      print "  # zest: lazy pulling needs CRI to pass layer labels to the snapshotter"
      print "  snapshotter = \"zest\""
      print "  disable_snapshot_annotations = false"
    }
    {
      line = $0; trimmed = line; gsub(/^[[:space:]]+|[[:space:]]+$/, "", trimmed)
      if (trimmed ~ /^\[/) {
        inside = (trimmed == table)
        print line
        if (inside) { keys(); seen = 1 }
        next
      }
      if (inside && trimmed ~ /^(snapshotter|disable_snapshot_annotations)[[:space:]]*=/) {
        print "  # zest: was " trimmed
        next
      }
      print line
    }
    END {
      if (!seen) { print ""; print table; keys() }
      print ""
      print "# zest: containerd reaches the zest snapshotter as proxy plugin \"zest\"."
      print "[proxy_plugins.zest]"
      print "  type = \"snapshot\""
      print "  address = \"" socket "\""
    }' "$file"
}

# Step 4 on $1 (a path as seen here), checking with `$check containerd ...`; the
# check runs on the path $2 (the same file as containerd sees it). Returns 0 when
# the file changed, 1 when it already had zest, exits on errors.
merge_containerd_config() {
  local file=$1 seen_as=$2 check=$3 socket=$4
  if [ -f "$file" ] && grep -Eq '^[[:space:]]*\[proxy_plugins\.("zest"|zest)\]' "$file"; then
    log "$file already has [proxy_plugins.zest]: left as it is"
    return 1
  fi
  local version="" table
  if [ -s "$file" ]; then
    # The top-level version key, before the first table.
    version=$(awk '/^[[:space:]]*\[/ { exit } /^[[:space:]]*version[[:space:]]*=/ { gsub(/[^0-9]/, ""); print; exit }' "$file")
  else
    version=2
    printf 'version = 2\n' >"$file.zest-empty" || die "cannot write next to $file"
  fi
  case "$version" in
    2) table='[plugins."io.containerd.grpc.v1.cri".containerd]' ;;
    3) table='[plugins."io.containerd.cri.v1.images"]' ;;
    *) rm -f "$file.zest-empty"
       die "$file has configuration version '${version:-1}'; zest handles versions 2 and 3: run 'containerd config migrate' first, or merge /usr/share/zest/containerd-config.toml by hand" ;;
  esac
  local input=$file
  [ -f "$file.zest-empty" ] && input=$file.zest-empty
  edit_containerd_config "$input" "$table" "$socket" >"$file.zest-new" || die "cannot write $file.zest-new"
  rm -f "$file.zest-empty"
  local dump
  if ! dump=$($check containerd --config "$seen_as.zest-new" config dump 2>&1); then
    rm -f "$file.zest-new"
    die "containerd rejects the edited configuration, so $file is left unchanged: $dump
merge /usr/share/zest/containerd-config.toml into it by hand and restart containerd"
  fi
  if ! grep -Eq '^[[:space:]]*snapshotter = "zest"' <<<"$dump" ||
    ! grep -Eq '^[[:space:]]*\[proxy_plugins\.("zest"|zest)\]' <<<"$dump"; then
    rm -f "$file.zest-new"
    die "after editing, containerd does not select zest for CRI (another file or an import overrides it?); $file is left unchanged: merge /usr/share/zest/containerd-config.toml by hand"
  fi
  local kept="it had none"
  if [ -f "$file" ]; then
    cp -p "$file" "$file.zest-backup" || die "cannot back up $file"
    kept="previous version: $file.zest-backup"
  fi
  mv -f "$file.zest-new" "$file" || die "cannot replace $file"
  log "configured containerd to use zest in $file ($kept)"
  return 0
}

if [ "${1:-}" = merge-containerd-config ]; then
  file=${2:?merge-containerd-config needs the configuration file}
  merge_containerd_config "$file" "$file" "" "${ZEST_SOCKET:-/run/zest/zest.sock}" || true
  exit 0
fi
[ $# -eq 0 ] || die "unknown arguments $* (see the comment at the top)"

[ -d "$host/etc" ] || die "the host's root is not mounted at $host"
[ -f "$config_source" ] || die "no configuration at $config_source (the zest-config ConfigMap)"
socket=$(socket_of "$config_source")
socket=${socket:-/run/zest/zest.sock}

changed=0
install_file /usr/bin/zest "$host/usr/local/bin/zest" 755 && changed=1
install_file "$files/zest.service" "$host/etc/systemd/system/zest.service" 644 && changed=1
install_file "$config_source" "$host/etc/zest/config.toml" 644 && changed=1

on_host systemctl daemon-reload
on_host systemctl enable --quiet zest.service
if [ "$changed" = 1 ] && on_host systemctl is-active --quiet zest.service; then
  log "restarting zest.service (mounts are handed over to the new process)"
  on_host systemctl restart zest.service
else
  on_host systemctl start zest.service
fi

for _ in $(seq 1 120); do
  [ -S "$host$socket" ] && break
  sleep 0.5
done
[ -S "$host$socket" ] || die "zest did not create $socket within 60 s: see journalctl -u zest on the node"

if merge_containerd_config "$host$containerd_config" "$containerd_config" on_host "$socket"; then
  log "restarting $containerd_unit once to load the proxy plugin (running containers keep running)"
  on_host systemctl restart "$containerd_unit"
fi
log "done"
