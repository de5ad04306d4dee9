"""A plain python-socketio script, as users already have them, pointed at herald.

Nothing herald-specific: connect, emit `subscribe`, handle the five session events.

    pip install "python-socketio[client]"
    python seed_client.py [SESSION_ID]        # HERALD_URL defaults to http://localhost:3000
"""

import os
import sys

import socketio

URL = os.environ.get("HERALD_URL", "http://localhost:3000")
SESSION_ID = sys.argv[1] if len(sys.argv) > 1 else "demo-1"

sio = socketio.Client()


@sio.event
def connect():
    print("connected", flush=True)
    sio.emit("subscribe", SESSION_ID)


@sio.on("subscribed")
def on_subscribed(data):
    print(f"subscribed {data['sessionId']} lastSeq {data['lastSeq']}", flush=True)


@sio.on("progress")
def on_progress(data):
    print(f"progress {data['seq']} {data['status']} {data['progress']}%", flush=True)


@sio.on("model_result")
def on_model_result(data):
    print(f"model_result {data['seq']} {data['promptId']} {data['modelName']} {data['status']}", flush=True)


@sio.on("clarification")
def on_clarification(data):
    print(f"clarification {data['seq']} {data['clarificationId']} {data['question']}", flush=True)


@sio.on("completed")
def on_completed(data):
    print(f"completed {data['seq']} {data['result']}", flush=True)
    sio.disconnect()


@sio.on("error")
def on_error(data):
    print(f"error {data.get('seq')} {data.get('code')} {data['error']}", flush=True)


sio.connect(URL)
sio.wait()
