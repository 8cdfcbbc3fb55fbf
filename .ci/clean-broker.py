"""Deletes the queues earlier test runs left on the local RabbitMQ.

Every broker test names its queues with a random 12-hex-digit suffix, so they
never collide; this removes exactly those, so runs do not pile up queues.
"""
import re
import subprocess
import sys

import pika

url = sys.argv[1] if len(sys.argv) > 1 else "amqp://guest:guest@127.0.0.1:5672/%2f"
listed = subprocess.run(
    ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
    capture_output=True, text=True, timeout=120, check=True,
).stdout.split()
stale = [name for name in listed if re.search(r"[0-9a-f]{12}", name)]
connection = pika.BlockingConnection(pika.URLParameters(url))
channel = connection.channel()
for name in stale:
    channel.queue_delete(queue=name)
connection.close()
print(f"deleted {len(stale)} test queues of {len(listed)}")
