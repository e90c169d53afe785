#!/bin/sh
# Install hasentinel @VERSION@ and its dependencies from this bundle, offline.
#
#   ./install.sh [--verify-only] [--force]
#
# Checks every file against SHA256SUMS, then installs the .debs in debs/ with
# apt from these files alone: no source list, no package list, no network.
# A dependency this system already has at the same or a newer version is left
# as it is. The dependencies are marked as automatically installed, so that
# `apt purge hasentinel && apt autoremove` takes them away again.
#
#   --verify-only  check the sums and the target system, install nothing
#   --force        install on a system other than Debian 12 @ARCH@
set -eu
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH

verify_only=no
force=no
for arg in "$@"; do
	case "$arg" in
	--verify-only) verify_only=yes ;;
	--force) force=yes ;;
	-h | --help) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
	*) echo "install.sh: unknown argument: $arg (see --help)" >&2; exit 2 ;;
	esac
done

fail() {
	echo "install.sh: $*" >&2
	exit 1
}

here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

# 1. Integrity: every file listed matches, and every .deb is listed.
[ -f SHA256SUMS ] || fail "SHA256SUMS is missing: the bundle is incomplete"
sha256sum --check --strict --quiet SHA256SUMS ||
	fail "checksum mismatch (above): the bundle is corrupt or was modified; get it again"
for f in debs/*.deb; do
	[ -e "$f" ] || fail "no .deb files in $here/debs"
	grep -q " $f\$" SHA256SUMS || fail "$f is not listed in SHA256SUMS; refusing to install it"
done
echo "install.sh: checksums OK ($(grep -c '\.deb$' SHA256SUMS) packages)"

# 2. The target: this bundle was resolved for Debian 12 on @ARCH@.
system_arch=$(dpkg --print-architecture)
. /etc/os-release
if [ "${ID:-}" != debian ] || [ "${VERSION_ID:-}" != 12 ] || [ "$system_arch" != @ARCH@ ]; then
	message="this bundle is for Debian 12 (@ARCH@), this system is ${PRETTY_NAME:-unknown} ($system_arch)"
	[ "$force" = yes ] || fail "$message; --force installs anyway"
	echo "install.sh: warning: $message" >&2
fi
[ "$verify_only" = yes ] && exit 0
[ "$(id -u)" = 0 ] || fail "run as root"

# 3. What to install: hasentinel, and each dependency this system does not
# already have at the bundled version or newer (apt would refuse to
# downgrade one named on its command line).
debs=
new_deps=
for f in debs/*.deb; do
	package=$(dpkg-deb -f "$f" Package)
	version=$(dpkg-deb -f "$f" Version)
	installed=$(dpkg-query -W -f '${db:Status-Abbrev} ${Version}' "$package" 2>/dev/null || true)
	case "$installed" in
	"ii  "*)
		if [ "$package" != hasentinel ] && dpkg --compare-versions "${installed#ii  }" ge "$version"; then
			continue
		fi
		;;
	*) [ "$package" = hasentinel ] || new_deps="$new_deps $package" ;;
	esac
	debs="$debs $here/$f"
done

# 4. apt with these files only: an empty source list and a private, empty
# package-list directory, so nothing is looked up or downloaded. Unattended:
# an existing /etc/hasentinel/hasentinel.yaml (an operator's, or one that
# configuration management put there first) is kept, never prompted about.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM
mkdir -p "$tmp/lists/partial" "$tmp/archives/partial" "$tmp/empty"
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086
apt-get -q -y --no-install-recommends \
	-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$tmp/empty" \
	-o Dir::State::Lists="$tmp/lists" -o Dir::Cache::Archives="$tmp/archives" \
	-o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= \
	-o Acquire::Languages=none -o APT::Get::List-Cleanup=false \
	-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
	install $debs

if [ -n "$new_deps" ]; then
	# shellcheck disable=SC2086
	apt-mark auto $new_deps >/dev/null
fi

cat <<'DONE'

hasentinel is installed. Next:
  hasentinel init --masters 10.0.0.11,10.0.0.12,10.0.0.13   # this cluster's masters
  hasentinel status
  hasentinel kubeconfig adopt --dry-run                      # then without --dry-run
DONE
