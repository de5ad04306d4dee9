// The socket.io-client code a front end already has, unchanged, pointed at herald.
//
//   Node >= 22.6:  node --experimental-strip-types examples/seed-client.ts <url> <sessionId>
//   Node 20:       npm run build && node dist/examples/seed-client.js <url> <sessionId>
//
// Prints one line per event: `<event> <json>`; exits 0 after `completed` or `error`
// (or after SEED_TIMEOUT_MS, default 30000, with exit code 1).
import { io } from 'socket.io-client';

type SessionEvent = { sessionId: string; seq: number; [key: string]: unknown };

const url: string = process.argv[2] ?? 'http://localhost:3000';
const sessionId: string | undefined = process.argv[3];
if (!sessionId) {
  console.error('usage: seed-client <url> <sessionId>');
  process.exit(2);
}

const socket = io(url);

socket.on('connect', () => {
  socket.emit('subscribe', sessionId);
});

socket.on('subscribed', (s: { sessionId: string; lastSeq: number }) => {
  console.log('subscribed', JSON.stringify(s));
});

socket.on('progress', (event: SessionEvent) => {
  console.log('progress', JSON.stringify(event));
});

socket.on('model_result', (event: SessionEvent) => {
  console.log('model_result', JSON.stringify(event));
});

socket.on('clarification', (event: SessionEvent) => {
  console.log('clarification', JSON.stringify(event));
});

socket.on('completed', (event: SessionEvent) => {
  console.log('completed', JSON.stringify(event));
  socket.disconnect();
});

socket.on('error', (event: SessionEvent) => {
  console.log('error', JSON.stringify(event));
  if (typeof event.seq === 'number') socket.disconnect();
});

const timer = setTimeout(() => {
  console.error('seed-client: timed out');
  process.exit(1);
}, Number(process.env.SEED_TIMEOUT_MS ?? 30000));
socket.on('disconnect', () => clearTimeout(timer));
