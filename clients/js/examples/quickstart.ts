// The README quick start, type-checked by `npm run build` against the published
// entry points (herald-client, herald-client/react). Run (after a build):
//   node dist/examples/quickstart.js http://127.0.0.1:3000
import { HeraldClient, HeraldError, type ProgressEvent, type SessionSnapshot } from 'herald-client';
import type { SessionState } from 'herald-client/react';

const url: string = process.argv[2] ?? 'http://127.0.0.1:3000';
const client = new HeraldClient(url, { transports: ['websocket'] });

const session: SessionSnapshot = await client.createSession({
  prompts: ['What is a monad?', 'Explain [clarify] closures'],
  models: ['sim-fast', 'sim-slow'],
});

const sub = client.subscribe(session.sessionId, {
  progress: (e: ProgressEvent) => console.log(`#${e.seq} ${e.status} ${e.progress}%`),
  modelResult: (e) => console.log(`#${e.seq} ${e.modelName} on ${e.promptId}: ${e.status}`),
  clarification: async (e) => {
    console.log(`#${e.seq} question: ${e.question} (${e.status})`);
    if (e.status === 'pending') await client.respond(e.sessionId, e.clarificationId, 'the basics');
  },
  completed: (e) => {
    console.log(`#${e.seq} completed`, JSON.stringify(e.result).slice(0, 200));
    sub.unsubscribe();
    client.close();
  },
  error: (e) => {
    console.log(`#${e.seq} failed: ${e.error} (${e.code})`);
    client.close();
  },
  onResync: (snapshot) => console.log(`resynced at seq ${snapshot.lastSeq}: ${snapshot.status}`),
});

try {
  await client.getSession('no-such-session');
} catch (err) {
  if (err instanceof HeraldError) console.log(`expected: ${err.status} ${err.code}`);
}

// The hook's state type, for components (see herald-client/react).
export type { SessionState };
