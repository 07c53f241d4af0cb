#!/bin/sh
# Skyward node bootstrap: installs and starts the agent for one node of one pool.
# The coordinator fills in the fields below for each node and hands the script to
# the provider as user-data / startup script / onstart. The token inside is single-use,
# short-lived and bound to this node; no private key is in here: the agent makes its own.
set -eu
pool=@@POOL@@
node_id=@@NODE_ID@@
coordinator=@@COORDINATOR@@
ca_pin=@@CA_PIN@@
agent_url=@@AGENT_URL@@
agent_ca=@@AGENT_CA@@
agent_sha256=@@AGENT_SHA256@@
listen=@@LISTEN@@
mig=@@MIG@@
lease=@@LEASE@@
deadline=@@DEADLINE@@
spot_watch=@@SPOT_WATCH@@
token=@@TOKEN@@

dir="${SKYWARD_DIR:-/var/lib/skyward}"
umask 077
mkdir -p "$dir/work"
cat > "$dir/ca.pem" <<'SKYWARD_CA'
@@CA_PEM@@
SKYWARD_CA

# An image with the agent preinstalled needs nothing fetched; otherwise the coordinator
# serves it over HTTPS, trusted through the pool CA alone (a URL of the user's own is
# trusted through the system's CAs).
agent="$(command -v skyward-agent || true)"
if [ -z "$agent" ]; then
    if [ -z "$agent_url" ]; then
        echo "skyward bootstrap: no skyward-agent on this image and no agent URL" >&2
        exit 1
    fi
    agent="$dir/skyward-agent"
    url=$(printf '%s' "$agent_url" | sed "s/{arch}/$(uname -m)/")
    if command -v curl >/dev/null 2>&1; then
        set --
        [ "$agent_ca" = pool ] && set -- --cacert "$dir/ca.pem"
        curl -fsS --retry 5 --retry-delay 2 --retry-all-errors "$@" -o "$agent.part" "$url"
    elif command -v wget >/dev/null 2>&1; then
        set --
        [ "$agent_ca" = pool ] && set -- --ca-certificate="$dir/ca.pem"
        wget -q --tries=5 "$@" -O "$agent.part" "$url"
    else
        echo "skyward bootstrap: neither curl nor wget is installed to fetch the agent" >&2
        exit 1
    fi
    # Run only the binary this script vouches for (its SHA-256), or one over HTTPS.
    want=$(printf '%s\n' $agent_sha256 | sed -n -e "s/^$(uname -m)=//p" -e 's/^[*]=//p')
    got=$(sha256sum "$agent.part" 2>/dev/null || openssl dgst -sha256 -r "$agent.part")
    got=${got%% *}
    if [ "${want:-$got}" != "$got" ] || { [ -z "$want" ] && [ "${url#https:}" = "$url" ]; }; then
        rm -f "$agent.part"
        echo "skyward bootstrap: the agent from $url has SHA-256 $got, not ${want:-given}: refusing to run it" >&2
        exit 1
    fi
    chmod 700 "$agent.part"
    mv "$agent.part" "$agent"
fi

# Either the agent dials the coordinator, or (reversed) it listens for the coordinator.
if [ -n "$listen" ]; then
    reach="SKYWARD_LISTEN=$listen"
else
    reach="SKYWARD_COORDINATOR=$coordinator"
fi
cat > "$dir/agent.env" <<SKYWARD_ENV
$reach
${mig:+SKYWARD_MIG=$mig}
${deadline:+SKYWARD_DEADLINE=$deadline}
${spot_watch:+SKYWARD_SPOT_WATCH=$spot_watch}
SKYWARD_CA_PIN=$ca_pin
SKYWARD_TOKEN=$token
SKYWARD_NODE_ID=$node_id
SKYWARD_WORK_DIR=$dir/work
SKYWARD_LEASE=$lease
SKYWARD_ON_POOL_END=poweroff
SKYWARD_ENV

if [ -z "${SKYWARD_NO_SYSTEMD:-}" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    cat > /etc/systemd/system/skyward-agent.service <<SKYWARD_UNIT
[Unit]
Description=Skyward agent (pool $pool, $node_id)
After=network-online.target
Wants=network-online.target

[Service]
EnvironmentFile=$dir/agent.env
ExecStart=$agent
KillMode=control-group
TimeoutStopSec=15
Restart=on-failure
RestartSec=2
SKYWARD_UNIT
    systemctl daemon-reload
    systemctl start skyward-agent
else
    # No systemd (containers such as VastAI's): detach from the bootstrap's session.
    set -a
    . "$dir/agent.env"
    set +a
    nohup setsid "$agent" >>"$dir/agent.log" 2>&1 </dev/null &
fi
echo "skyward bootstrap: agent for $node_id of pool $pool started"
