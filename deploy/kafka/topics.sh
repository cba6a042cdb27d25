#!/usr/bin/env sh
# Topics of the Kafka transport ([federation] transport = kafka). hintfed-agent creates them
# itself when it has the rights; with stricter ACLs, an operator runs this once.
#   BOOTSTRAP=kafka-1:9092 sh deploy/kafka/topics.sh
set -eu
BOOTSTRAP=${BOOTSTRAP:-localhost:9092}
RF=${REPLICATION:-3}

# The state topic is the snapshot: log compaction keeps the newest record of every
# <kind>/<origin>/<key>, so a starting agent reads it from the beginning.
kafka-topics.sh --bootstrap-server "$BOOTSTRAP" --create --if-not-exists \
  --topic hintfed.state --partitions 6 --replication-factor "$RF" \
  --config cleanup.policy=compact \
  --config min.compaction.lag.ms=0 \
  --config segment.ms=3600000 \
  --config min.insync.replicas=2

# Heartbeats only matter for a few timeouts: short retention, deleted not compacted.
kafka-topics.sh --bootstrap-server "$BOOTSTRAP" --create --if-not-exists \
  --topic hintfed.heartbeat --partitions 1 --replication-factor "$RF" \
  --config cleanup.policy=delete \
  --config retention.ms=600000
