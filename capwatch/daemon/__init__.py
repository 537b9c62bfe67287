"""The long-running part: watching folders, settling file events, the job pipeline, the service loop, the instance
lock and live state, and systemd notification."""
