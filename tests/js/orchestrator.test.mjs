// 9. The orchestrator end to end (docs/orchestrator.md): herald runs 4 prompts × 3 models
// (a simulated model and two real-protocol models served by the fake LLM of fake-llm.mjs,
// one Ollama and one OpenAI) with strategy "all"; one prompt asks for a clarification,
// answered over HTTP. Real socket.io-client sockets (a websocket "seed-shaped" front end
// and a polling-only one) must see the exact event sequence, and a late subscriber the
// same run again by replay.
//
// The clarified prompt (p2) contains both `[clarify]` (the simulated provider asks) and the
// fake's marker `[needs-detail]` (the fake Ollama and OpenAI models reply
// `CLARIFICATION_NEEDED: …`), so all three models of p2 ask, one clarification each; the
// three answers are distinct, and each model's final output must contain its own answer.
// The test answers only once all three are pending and the other prompts have completed.
//
// Both live clients subscribe after the POST with `lastSeq: 0`, so they get the run from
// seq 1 (replay, then live). HERALD_TEST_DUMP_EVENTS=1 prints the run as TAP diagnostics.

import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { io } from 'socket.io-client';
import {
  spawnHerald, stopAndAssertClean, record, waitFor, eventsOf, emitAck, getJson, assertIsoMs,
  closeAll, safeJson,
} from './helpers.mjs';
import { startFakeLlm, CLARIFICATION_PREFIX } from './fake-llm.mjs';

const SESSION_EVENTS = new Set(['progress', 'model_result', 'clarification', 'completed', 'error']);
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const RUN_TIMEOUT = 20000;
const UPDATE_INTERVAL_MS = 100;
const FAKE_TOKENS = 30;
const FAKE_DELAY_MS = 15;
const FAKE_MARKER = '[needs-detail]';
const API_KEY = `sk-herald-test-${process.pid}`;
const KEY_ENV = 'HERALD_TEST_FAKE_OPENAI_KEY';

const MODELS = [
  { name: 'sim', provider: 'simulated' },
  { name: 'olla', provider: 'ollama', providerModel: 'fake-llama' },
  { name: 'oai', provider: 'openai', providerModel: 'fake-gpt' },
];
const MODEL_NAMES = MODELS.map((m) => m.name);
const byName = Object.fromEntries(MODELS.map((m) => [m.name, m]));

const PROMPTS = [
  'Explain event sourcing in two sentences.',
  `Summarise the quarterly report [clarify] ${FAKE_MARKER}`,
  'List three uses of Rust.',
  'Say good morning in French.',
];
const PROMPT_IDS = PROMPTS.map((_, i) => `p${i + 1}`);
const CLARIFIED = 'p2';
const CLARIFIED_TEXT = PROMPTS[1];
const fakeQuestion = (model) => `Which aspect should ${model} focus on?`;
// Which model asked, from the question text.
const QUESTIONS = {
  [`What should I focus on for "${CLARIFIED_TEXT}"?`]: 'sim',
  [fakeQuestion('fake-llama')]: 'olla',
  [fakeQuestion('fake-gpt')]: 'oai',
};

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function postJson(baseUrl, p, body) {
  const res = await fetch(`${baseUrl}${p}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  let parsed;
  try { parsed = text.length ? JSON.parse(text) : undefined; } catch { parsed = text; }
  return { status: res.status, body: parsed };
}

function configToml(fakeUrl) {
  return `# written by tests/js/orchestrator.test.mjs
[orchestrator]
max_concurrency = 12
clarification_timeout_secs = 60
update_interval_ms = ${UPDATE_INTERVAL_MS}
retry_backoff_ms = 50

[[models]]
name = "sim"
provider = "simulated"
latency_ms = 10
tokens_per_sec = 300
max_concurrency = 4

[[models]]
name = "olla"
provider = "ollama"
base_url = "${fakeUrl}"
model = "fake-llama"
timeout_secs = 20
retries = 0
max_concurrency = 4

[[models]]
name = "oai"
provider = "openai"
base_url = "${fakeUrl}/v1"
model = "fake-gpt"
api_key_env = "${KEY_ENV}"
timeout_secs = 20
retries = 0
max_concurrency = 4
`;
}

let fake;
let server;
let tmpDir;
before(async () => {
  fake = await startFakeLlm({
    tokens: FAKE_TOKENS,
    delayMs: FAKE_DELAY_MS,
    marker: FAKE_MARKER,
    question: (model) => fakeQuestion(model),
    apiKey: API_KEY,
  });
  tmpDir = await fs.mkdtemp(path.join(os.tmpdir(), 'herald-orchestrator-'));
  const configPath = path.join(tmpDir, 'herald.toml');
  await fs.writeFile(configPath, configToml(fake.url));
  server = await spawnHerald(['--config', configPath], { env: { [KEY_ENV]: API_KEY } });
});
after(async () => {
  try {
    await stopAndAssertClean(server);
  } finally {
    if (fake) await fake.close();
    if (tmpDir) await fs.rm(tmpDir, { recursive: true, force: true });
  }
});

/** The session events a socket received for sessionId, in arrival order: [{ event, payload }]. */
function sessionEvents(socket, sessionId) {
  return eventsOf(socket, (e) => SESSION_EVENTS.has(e.event) && e.payload && e.payload.sessionId === sessionId)
    .map((e) => ({ event: e.event, payload: e.payload }));
}

/**
 * What the later checks need from a run, without asserting anything: the last model_result
 * per `${promptId}|${modelName}` and, per model, the answer to its clarification (told apart
 * by the question text).
 */
function extract(events, answers) {
  const terminals = new Map();
  const questions = new Map();
  for (const { event, payload: d } of events) {
    if (event === 'model_result') terminals.set(`${d.promptId}|${d.modelName}`, d);
    if (event === 'clarification' && d.status === 'pending') questions.set(d.clarificationId, d.question);
  }
  const answerOf = {};
  for (const [id, question] of questions) {
    if (QUESTIONS[question] && answers.has(id)) answerOf[QUESTIONS[question]] = answers.get(id);
  }
  return { terminals, answerOf };
}

const describeEvents = (events) =>
  events.map((e) => `#${e.payload.seq} ${e.event} ${safeJson(e.payload, 240)}`).join('\n  ');

/**
 * Check the whole run a client received against docs/orchestrator.md. `answers` maps a
 * clarificationId to the answer posted for it. Returns what the later checks need.
 */
function checkRun(events, { sessionId, answers, who }) {
  const ctx = (i) => `${who}, event #${i + 1} of ${events.length}:\n  ${describeEvents(events.slice(Math.max(0, i - 4), i + 2))}`;
  assert.ok(events.length > 0, `${who}: no session events`);

  // seq contiguous from 1, no duplicates, in arrival order; well-formed envelope.
  events.forEach((e, i) => {
    assert.equal(e.payload.sessionId, sessionId, ctx(i));
    assert.equal(e.payload.seq, i + 1, `seq must be contiguous from 1 in arrival order (${ctx(i)})`);
    assertIsoMs(e.payload.timestamp, `${who} #${i + 1} ${e.event}.timestamp`);
  });
  const errors = events.filter((e) => e.event === 'error');
  assert.deepStrictEqual(errors, [], `${who}: no error event expected`);

  // The first event: progress PROCESSING, 0, every prompt pending.
  const first = events[0];
  assert.equal(first.event, 'progress', `the first event is progress (${ctx(0)})`);
  assert.equal(first.payload.status, 'PROCESSING', ctx(0));
  assert.equal(first.payload.progress, 0, ctx(0));
  assert.deepStrictEqual(first.payload.prompts, { total: 4, completed: 0, processing: 0, pending: 4, failed: 0 }, ctx(0));

  // completed is the last session event, right after the final progress.
  const lastIdx = events.length - 1;
  assert.equal(events[lastIdx].event, 'completed', `completed must be the last session event (${ctx(lastIdx)})`);
  assert.equal(events.filter((e) => e.event === 'completed').length, 1, `${who}: exactly one completed`);
  const progressIdx = events.map((e, i) => (e.event === 'progress' ? i : -1)).filter((i) => i >= 0);
  const lastProgressIdx = progressIdx[progressIdx.length - 1];
  assert.equal(lastProgressIdx, lastIdx - 1, `the final progress comes right before completed (${ctx(lastIdx - 1)})`);
  const finalProgress = events[lastProgressIdx].payload;
  assert.equal(finalProgress.status, 'COMPLETED', ctx(lastProgressIdx));
  assert.equal(finalProgress.progress, 100, ctx(lastProgressIdx));
  assert.equal(finalProgress.hasResult, true, ctx(lastProgressIdx));
  assert.deepStrictEqual(finalProgress.prompts, { total: 4, completed: 4, processing: 0, pending: 0, failed: 0 }, ctx(lastProgressIdx));
  assert.equal(finalProgress.hasClarifications, false, ctx(lastProgressIdx));
  assert.equal(finalProgress.clarificationCount, 0, ctx(lastProgressIdx));

  // Walk the run.
  const pairs = new Map();   // `${promptId}|${modelName}` -> { start, partials, terminal, durations }
  for (const p of PROMPT_IDS) for (const m of MODEL_NAMES) {
    pairs.set(`${p}|${m}`, { promptId: p, modelName: m, start: null, partials: [], terminal: null });
  }
  const pending = new Map();   // clarificationId -> pending payload
  const answered = new Map();  // clarificationId -> { pending, answered }
  let lastProgress = -Infinity;
  const derived = () => {
    const c = { total: 4, completed: 0, processing: 0, pending: 0, failed: 0 };
    for (const p of PROMPT_IDS) {
      const ps = MODEL_NAMES.map((m) => pairs.get(`${p}|${m}`));
      const ended = ps.filter((x) => x.terminal);
      if (!ps.some((x) => x.start)) c.pending += 1;
      else if (ended.length < ps.length) c.processing += 1;
      else if (ended.some((x) => x.terminal.status === 'completed')) c.completed += 1;
      else c.failed += 1;
    }
    return c;
  };

  events.forEach((e, i) => {
    const d = e.payload;
    if (e.event === 'model_result') {
      const key = `${d.promptId}|${d.modelName}`;
      const pair = pairs.get(key);
      assert.ok(pair, `model_result for an unknown prompt/model ${key} (${ctx(i)})`);
      assert.equal(d.provider, byName[d.modelName].provider, `provider of ${d.modelName} (${ctx(i)})`);
      assert.equal(typeof d.duration, 'number', `duration is a number (${ctx(i)})`);
      assert.ok(d.duration >= 0, ctx(i));
      assert.equal(typeof d.result, 'string', `result is a string (${ctx(i)})`);
      assert.equal(pair.terminal, null, `no model_result after the terminal one for ${key} (${ctx(i)})`);
      const previous = pair.partials.length ? pair.partials[pair.partials.length - 1] : pair.start;
      if (previous) {
        assert.ok(d.duration >= previous.duration, `duration never decreases for ${key} (${ctx(i)})`);
      }
      if (d.status === 'processing') {
        if (!pair.start) {
          assert.equal(d.result, '', `the start of ${key} has result "" (${ctx(i)})`);
          assert.equal(d.duration, 0, `the start of ${key} has duration 0 (${ctx(i)})`);
          pair.start = d;
        } else {
          assert.notEqual(d.result, '', `exactly one processing start (result "") per model and prompt: second one for ${key} (${ctx(i)})`);
          if (pair.partials.length) {
            const prev = pair.partials[pair.partials.length - 1];
            assert.ok(d.result.length > prev.result.length && d.result.startsWith(prev.result),
              `partial results of ${key} only grow: ${safeJson(prev.result)} then ${safeJson(d.result)} (${ctx(i)})`);
            const gap = Date.parse(d.timestamp) - Date.parse(prev.timestamp);
            assert.ok(gap >= UPDATE_INTERVAL_MS * 0.6,
              `at most one processing update per ${UPDATE_INTERVAL_MS} ms for ${key}: ${gap} ms apart (${ctx(i)})`);
          }
          pair.partials.push(d);
        }
      } else if (d.status === 'completed' || d.status === 'failed') {
        assert.ok(pair.start, `terminal model_result for ${key} without a start (${ctx(i)})`);
        pair.terminal = d;
      } else {
        assert.fail(`model_result status ${safeJson(d.status)} (${ctx(i)})`);
      }
    } else if (e.event === 'clarification') {
      const id = d.clarificationId;
      if (d.status === 'pending') {
        assert.match(String(id), UUID, `clarificationId is a UUID (${ctx(i)})`);
        assert.equal(typeof d.question, 'string', ctx(i));
        assert.ok(!pending.has(id) && !answered.has(id), `clarification ${id} pending twice (${ctx(i)})`);
        pending.set(id, d);
      } else if (d.status === 'answered') {
        assert.ok(pending.has(id), `clarification ${id} answered without being pending (${ctx(i)})`);
        assert.ok(answers.has(id), `clarification ${id} answered but the test never answered it (${ctx(i)})`);
        assert.equal(d.answer, answers.get(id), `the answered event carries the answer (${ctx(i)})`);
        assert.equal(d.question, pending.get(id).question, `the answered event keeps the question (${ctx(i)})`);
        answered.set(id, { pending: pending.get(id), answered: d });
        pending.delete(id);
      } else {
        assert.fail(`unexpected clarification status ${safeJson(d.status)} (${ctx(i)})`);
      }
    } else if (e.event === 'progress') {
      const c = d.prompts;
      assert.ok(c && typeof c === 'object', `progress.prompts (${ctx(i)})`);
      assert.equal(c.total, 4, `prompts.total (${ctx(i)})`);
      assert.equal(c.total, c.completed + c.processing + c.pending + c.failed,
        `total = completed + processing + pending + failed (${ctx(i)})`);
      assert.deepStrictEqual({ ...c }, derived(),
        `progress counts must match the model_results logged before it (${ctx(i)})`);
      assert.equal(d.hasClarifications, pending.size > 0,
        `hasClarifications while ${pending.size} clarification(s) pending (${ctx(i)})`);
      assert.equal(d.clarificationCount, pending.size, `clarificationCount (${ctx(i)})`);
      assert.equal(typeof d.progress, 'number', ctx(i));
      assert.ok(d.progress >= lastProgress, `progress never decreases: ${lastProgress} then ${d.progress} (${ctx(i)})`);
      lastProgress = d.progress;
      if (i !== lastProgressIdx) {
        assert.ok(d.progress >= 0 && d.progress <= 99, `progress 0-99 while running (${ctx(i)})`);
        assert.ok(!['COMPLETED', 'FAILED', 'EXPIRED'].includes(d.status), `status while running (${ctx(i)})`);
      }
    }
  });

  // Exactly one start and one terminal per model and prompt: 12 each, all completed.
  const starts = events.filter((e) => e.event === 'model_result' && e.payload.status === 'processing' && e.payload.result === '');
  assert.equal(starts.length, 12, `${who}: exactly 12 processing starts`);
  const terminals = events.filter((e) => e.event === 'model_result' && e.payload.status !== 'processing');
  assert.equal(terminals.length, 12, `${who}: exactly 12 terminal model_results`);
  for (const [key, pair] of pairs) {
    assert.ok(pair.start, `${who}: ${key} never started`);
    assert.ok(pair.terminal, `${who}: ${key} never ended`);
    assert.equal(pair.terminal.status, 'completed', `${who}: ${key} ended ${safeJson(pair.terminal)}`);
    for (const p of pair.partials) {
      assert.ok(pair.terminal.result.startsWith(p.result),
        `${who}: partial ${safeJson(p.result)} of ${key} is a prefix of the final output ${safeJson(pair.terminal.result)}`);
    }
  }
  // Real (fake) models stream 30 tokens × 15 ms: herald forwards several partial updates.
  for (const m of ['olla', 'oai']) for (const p of PROMPT_IDS) {
    const pair = pairs.get(`${p}|${m}`);
    assert.ok(pair.partials.length >= 2,
      `${who}: ${p}|${m} streamed for ≥ ${FAKE_TOKENS * FAKE_DELAY_MS} ms but got ${pair.partials.length} partial update(s)`);
    assert.ok(pair.terminal.duration >= (FAKE_TOKENS - 1) * FAKE_DELAY_MS - 5,
      `${who}: ${p}|${m} duration ${pair.terminal.duration} ms is shorter than the stream`);
  }

  // Clarifications: 3 pending (one per model on p2), each answered with its answer.
  assert.equal(pending.size, 0, `${who}: clarifications left pending: ${safeJson([...pending.values()])}`);
  assert.equal(answered.size, 3, `${who}: expected 3 answered clarifications (sim, olla, oai on ${CLARIFIED}), got ${answered.size}`);
  const answerOf = {};   // modelName -> answer
  for (const { pending: p, answered: a } of answered.values()) {
    const model = QUESTIONS[p.question];
    assert.ok(model, `${who}: unexpected question ${safeJson(p.question)}; expected one of ${safeJson(Object.keys(QUESTIONS))}`);
    assert.ok(!(model in answerOf), `${who}: two clarifications from ${model}`);
    answerOf[model] = a.answer;
  }
  // All three were pending at once (the test answers only then).
  assert.ok(events.some((e) => e.event === 'progress' && e.payload.hasClarifications === true && e.payload.clarificationCount === 3),
    `${who}: no progress with hasClarifications: true and clarificationCount: 3`);
  // While p2 was paused, the other prompts ran to completion (the test answers only then).
  const firstAnswered = events.findIndex((e) => e.event === 'clarification' && e.payload.status === 'answered');
  for (const p of PROMPT_IDS.filter((x) => x !== CLARIFIED)) for (const m of MODEL_NAMES) {
    const at = events.findIndex((e) => e.event === 'model_result' && e.payload.promptId === p &&
      e.payload.modelName === m && e.payload.status !== 'processing');
    assert.ok(at >= 0 && at < firstAnswered,
      `${who}: ${p}|${m} must finish while ${CLARIFIED} waits for its answers (terminal at #${at + 1}, first answer at #${firstAnswered + 1})`);
  }

  // The result: per prompt, each model's output, equal to the terminal model_results.
  const result = events[lastIdx].payload.result;
  assert.ok(result && typeof result === 'object', `${who}: completed.result ${safeJson(result)}`);
  assert.equal(result.strategy, 'all', `${who}: result.strategy`);
  assert.deepStrictEqual((result.models || []).map((m) => (typeof m === 'string' ? m : m && m.name)), MODEL_NAMES,
    `${who}: result.models ${safeJson(result.models)}`);
  assert.ok(Array.isArray(result.prompts) && result.prompts.length === 4, `${who}: result.prompts ${safeJson(result.prompts, 2000)}`);
  result.prompts.forEach((rp, i) => {
    const promptId = PROMPT_IDS[i];
    assert.equal(rp.promptId, promptId, `${who}: result.prompts[${i}].promptId`);
    assert.equal(rp.text, PROMPTS[i], `${who}: result.prompts[${i}].text`);
    assert.equal(rp.status, 'completed', `${who}: result.prompts[${i}].status`);
    assert.ok(Array.isArray(rp.outputs), `${who}: result.prompts[${i}].outputs`);
    assert.deepStrictEqual(rp.outputs.map((o) => o.modelName), MODEL_NAMES, `${who}: ${promptId} outputs in model order`);
    rp.outputs.forEach((o) => {
      const terminal = pairs.get(`${promptId}|${o.modelName}`).terminal;
      const what = `${who}: result ${promptId}/${o.modelName}`;
      assert.equal(o.provider, byName[o.modelName].provider, `${what}.provider`);
      assert.equal(o.status, 'completed', `${what}.status`);
      assert.equal(o.output, terminal.result, `${what}.output equals the terminal model_result`);
      assert.ok(!('error' in o) || o.error == null, `${what}.error ${safeJson(o.error)}`);
      assert.equal(typeof o.duration, 'number', `${what}.duration`);
      assert.ok(Number.isInteger(o.attempts) && o.attempts >= 1, `${what}.attempts ${safeJson(o.attempts)}`);
      const answersHere = Object.values(answerOf).filter((a) => o.output.includes(a));
      if (promptId === CLARIFIED) {
        assert.deepStrictEqual(answersHere, [answerOf[o.modelName]],
          `${what}: the clarified output contains its own answer ${safeJson(answerOf[o.modelName])} and no other: ${safeJson(o.output)}`);
      } else {
        assert.deepStrictEqual(answersHere, [], `${what}: an unclarified output contains no answer`);
      }
    });
  });
  const sim = result.prompts[1].outputs[0];
  assert.ok(sim.output.includes(`(clarified: ${answerOf.sim})`),
    `${who}: the simulated model's clarified output includes "(clarified: <answer>)": ${safeJson(sim.output)}`);

}

describe('orchestrator: 4 prompts × 3 models (simulated, Ollama, OpenAI) with a clarification', () => {
  test('GET /api/models lists the configured models in order', async () => {
    const r = await getJson(server.url, '/api/models');
    assert.equal(r.status, 200, safeJson(r.body));
    assert.ok(Array.isArray(r.body.models), safeJson(r.body));
    assert.deepStrictEqual(r.body.models.map((m) => [m.name, m.provider]), MODELS.map((m) => [m.name, m.provider]));
    for (const m of r.body.models) assert.equal(m.maxConcurrency, 4, `${m.name}.maxConcurrency ${safeJson(m)}`);
    for (const m of r.body.models.slice(1)) {
      assert.equal(m.retries, 0, `${m.name}.retries`);
      assert.equal(m.timeoutSecs, 20, `${m.name}.timeoutSecs`);
    }
  });

  test('every client sees the exact run; a late subscriber replays it', async (t) => {
    const sockets = [];
    let fallback = null;   // the responder's timer (below)
    try {
      // A polling-only client, connected before the session exists.
      const polling = io(server.url, { transports: ['polling'], forceNew: true, reconnection: false });
      record(polling);
      sockets.push(polling);
      await waitFor(polling, 'connected');

      const metadata = { suite: 'js-orchestrator', tags: ['e2e'] };
      const created = await postJson(server.url, '/api/wizard/sessions',
        { prompts: PROMPTS, models: MODEL_NAMES, strategy: 'all', metadata });
      assert.equal(created.status, 201, `POST /api/wizard/sessions: ${safeJson(created.body, 2000)}`);
      const { sessionId } = created.body;
      assert.match(String(sessionId), UUID, `sessionId is a new UUID: ${safeJson(created.body)}`);
      assert.deepStrictEqual(created.body.metadata, metadata, 'the snapshot carries the metadata');

      // The seed-shaped front end: websocket only, subscribes in its connect handler (on every
      // (re)connect, from the last seq it saw), answers clarifications over HTTP. (forceNew only
      // so that it does not share the polling client's Manager.)
      const seed = io(server.url, { transports: ['websocket'], forceNew: true });
      record(seed);
      sockets.push(seed);
      let seedLastSeq = 0;
      seed.onAny((event, payload) => {
        if (SESSION_EVENTS.has(event) && payload && payload.sessionId === sessionId && Number.isInteger(payload.seq)) {
          seedLastSeq = Math.max(seedLastSeq, payload.seq);
        }
      });
      seed.on('connect', () => seed.emit('subscribe', { sessionId, lastSeq: seedLastSeq }));

      // Clarifications are answered once all three are pending *and* the other three prompts
      // have completed (so the run must keep going while p2 is paused), or 8 s after the
      // first one arrived, whichever comes first (then the checks below say what was missing).
      const answers = new Map();     // clarificationId -> answer
      const responses = [];          // promises of { id, answer, first, again }
      const waiting = [];            // pending clarifications not answered yet
      let othersDone = false;
      let answerNow = false;
      const respond = (c) => {
        const answer = `concentrate on topic ${answers.size + 1} (${String(c.clarificationId).slice(0, 8)})`;
        answers.set(c.clarificationId, answer);
        const body = { sessionId, clarificationId: c.clarificationId, answer };
        responses.push((async () => {
          const first = await postJson(server.url, '/api/wizard/clarifications/respond', body);
          // A second answer to the same clarification is refused.
          const again = first.status === 200
            ? await postJson(server.url, '/api/wizard/clarifications/respond', { ...body, answer: 'too late' })
            : null;
          return { id: c.clarificationId, answer, first, again };
        })());
      };
      const maybeAnswer = () => {
        if (answerNow || (othersDone && waiting.length + answers.size >= 3)) {
          answerNow = true;
          clearTimeout(fallback);
          for (const c of waiting.splice(0)) respond(c);
        }
      };
      seed.on('clarification', (c) => {
        if (!c || c.sessionId !== sessionId || c.status !== 'pending') return;
        if (answers.has(c.clarificationId) || waiting.some((w) => w.clarificationId === c.clarificationId)) return;
        waiting.push(c);
        if (!fallback) fallback = setTimeout(() => { answerNow = true; maybeAnswer(); }, 8000);
        maybeAnswer();
      });
      seed.on('progress', (p) => {
        if (p && p.sessionId === sessionId && p.prompts && p.prompts.completed >= 3) {
          othersDone = true;
          maybeAnswer();
        }
      });

      const pollAck = await emitAck(polling, 'subscribe', { sessionId, lastSeq: 0 });
      assert.equal(pollAck.ok, true, `polling subscribe ack ${safeJson(pollAck)}`);
      assert.equal(pollAck.recovered, true, `polling subscribe ack ${safeJson(pollAck)}`);

      const started = Date.now();
      await Promise.all([seed, polling].map((s) =>
        waitFor(s, 'completed', RUN_TIMEOUT, (p) => p && p.sessionId === sessionId)));
      const runMs = Date.now() - started;
      await sleep(300);   // anything after completed would show up here

      const settled = await Promise.all(responses);

      const seedEvents = sessionEvents(seed, sessionId);
      const pollEvents = sessionEvents(polling, sessionId);
      const run = extract(seedEvents, answers);
      if (process.env.HERALD_TEST_DUMP_EVENTS) {
        for (const e of seedEvents) t.diagnostic(`#${e.payload.seq} ${e.event} ${safeJson(e.payload, 400)}`);
      }
      await t.test('websocket seed client: event-sequence invariants', () => {
        checkRun(seedEvents, { sessionId, answers, who: 'websocket client' });
      });
      await t.test('polling client: event-sequence invariants', () => {
        checkRun(pollEvents, { sessionId, answers, who: 'polling client' });
      });
      await t.test('both clients received the same events', () => {
        assert.deepStrictEqual(pollEvents, seedEvents);
      });

      await t.test('clarifications answered over HTTP; both clients stayed connected', () => {
        assert.equal(settled.length, 3, `expected 3 clarifications to answer, got ${settled.length}`);
        for (const r of settled) {
          assert.equal(r.first.status, 200, `respond ${r.id}: ${safeJson(r.first.body)}`);
          assert.deepStrictEqual(r.first.body, { ok: true, sessionId, clarificationId: r.id }, `respond ${r.id} body`);
          assert.equal(r.again.status, 409, `second respond to ${r.id}: ${safeJson(r.again.body)}`);
          assert.equal(r.again.body && r.again.body.error && r.again.body.error.code, 'CLARIFICATION_CLOSED',
            `second respond to ${r.id}: ${safeJson(r.again.body)}`);
        }

        assert.deepStrictEqual(seed.__rec.disconnects, [], 'the seed client stayed connected');
        assert.deepStrictEqual(polling.__rec.disconnects, [], 'the polling client stayed connected');
        for (const s of [seed, polling]) {
          const protocolErrors = eventsOf(s, (e) => e.event === 'error' && !(e.payload && Number.isInteger(e.payload.seq)));
          assert.deepStrictEqual(protocolErrors.map((e) => e.payload), [], 'no protocol error events');
        }
      });

      await t.test('the fake LLM got the documented requests', () => {
        const reqs = fake.requests;
        for (const m of ['olla', 'oai']) {
          const { provider, providerModel } = byName[m];
          const mine = reqs.filter((r) => r.provider === provider);
          const expectedPath = provider === 'ollama' ? '/api/chat' : '/v1/chat/completions';
          assert.equal(mine.length, 5, `${m}: 4 prompts + 1 follow-up, got ${safeJson(mine.map((r) => r.raw), 3000)}`);
          for (const r of mine) {
            assert.equal(r.path, expectedPath, `${m} request path`);
            assert.equal(r.status, 200, `${m} request status (${safeJson(r.raw, 500)})`);
            assert.equal(r.aborted, false, `${m} request was not dropped`);
            assert.equal(r.body.model, providerModel, `${m} sends the provider's model id`);
            assert.equal(r.body.stream, true, `${m} streams`);
            const msgs = r.body.messages;
            assert.equal(msgs[0].role, 'system', `${m}: a system message first: ${safeJson(msgs)}`);
            assert.ok(msgs[0].content.includes(CLARIFICATION_PREFIX), `${m}: the system message explains ${CLARIFICATION_PREFIX}`);
            assert.equal(msgs[1].role, 'user', `${m}: then the prompt: ${safeJson(msgs)}`);
            assert.ok(PROMPTS.includes(msgs[1].content), `${m}: the user message is the prompt text: ${safeJson(msgs[1])}`);
            if (provider === 'openai') {
              assert.equal(r.headers.authorization, `Bearer ${API_KEY}`, 'OpenAI requests carry the key');
            }
          }
          for (const [i, text] of PROMPTS.entries()) {
            const promptId = PROMPT_IDS[i];
            const forPrompt = mine.filter((r) => r.body.messages[1].content === text);
            const output = run.terminals.get(`${promptId}|${m}`)?.result;
            assert.equal(typeof output, 'string', `${m}/${promptId}: a terminal model_result with an output`);
            if (promptId !== CLARIFIED) {
              assert.equal(forPrompt.length, 1, `${m}/${promptId}: one request`);
              assert.deepStrictEqual(forPrompt[0].body.messages.map((x) => x.role), ['system', 'user']);
              assert.equal(output, forPrompt[0].reply.text, `${m}/${promptId}: the output is the streamed reply, token for token`);
              continue;
            }
            assert.equal(forPrompt.length, 2, `${m}/${promptId}: the question, then the follow-up`);
            const [ask, follow] = forPrompt;
            assert.equal(ask.reply.kind, 'ask');
            const msgs = follow.body.messages;
            assert.deepStrictEqual(msgs.map((x) => x.role), ['system', 'user', 'assistant', 'user'],
              `${m}: the follow-up carries the conversation: ${safeJson(msgs)}`);
            assert.equal(msgs[2].content.trim(), ask.reply.text, `${m}: the assistant turn is the question as asked`);
            assert.ok(msgs[3].content.includes(run.answerOf[m]), `${m}: the last user message has the answer: ${safeJson(msgs[3])}`);
            assert.equal(follow.reply.kind, 'answer');
            assert.equal(output, follow.reply.text, `${m}/${promptId}: the output is the follow-up's streamed reply`);
            assert.ok(output.includes(run.answerOf[m]), `${m}/${promptId}: the output includes the answer`);
          }
        }
      });

      const lastSeq = seedEvents.length;
      await t.test('a late subscriber with lastSeq 0 replays the whole run', async () => {
        const late = io(server.url, { transports: ['websocket'], forceNew: true, reconnection: false });
        record(late);
        sockets.push(late);
        await waitFor(late, 'connected');
        const ack = await emitAck(late, 'subscribe', { sessionId, lastSeq: 0 });
        assert.equal(ack.ok, true, safeJson(ack));
        assert.equal(ack.lastSeq, lastSeq, `ack.lastSeq ${safeJson(ack)}`);
        assert.equal(ack.recovered, true, `ack.recovered ${safeJson(ack)}`);
        await waitFor(late, 'completed', 5000, (p) => p && p.sessionId === sessionId);
        await sleep(200);
        assert.deepStrictEqual(sessionEvents(late, sessionId), seedEvents,
          'the replay has the same events in the same order (same seq, same event, same payload)');
      });

      await t.test('the snapshot and the history describe the completed run', async () => {
        const snap = await getJson(server.url, `/api/wizard/session/${sessionId}`);
        assert.equal(snap.status, 200, safeJson(snap.body));
        const s = snap.body;
        assert.equal(s.status, 'COMPLETED', safeJson(s, 2000));
        assert.equal(s.lastSeq, lastSeq, 'snapshot.lastSeq is the last seq');
        assert.equal(s.progress, 100);
        assert.deepStrictEqual(s.prompts, { total: 4, completed: 4, processing: 0, pending: 0, failed: 0 });
        assert.equal(s.hasClarifications, false);
        assert.equal(s.clarificationCount, 0);
        assert.deepStrictEqual(s.metadata, metadata);
        assert.deepStrictEqual(s.result, seedEvents[lastSeq - 1].payload.result, 'snapshot.result is completed.result');
        assert.deepStrictEqual(
          s.clarifications.map((c) => [c.clarificationId, c.status, c.answer]).sort(),
          [...answers].map(([id, a]) => [id, 'answered', a]).sort(),
          `snapshot.clarifications ${safeJson(s.clarifications)}`);
        assert.equal(s.modelResults.length, 12, `snapshot.modelResults ${safeJson(s.modelResults, 1000)}`);
        for (const mr of s.modelResults) {
          const terminal = run.terminals.get(`${mr.promptId}|${mr.modelName}`) ?? {};
          for (const k of ['promptId', 'modelName', 'provider', 'status', 'result', 'duration']) {
            assert.deepStrictEqual(mr[k], terminal[k], `snapshot.modelResults ${mr.promptId}/${mr.modelName}.${k}`);
          }
        }

        const hist = await getJson(server.url, `/api/wizard/session/${sessionId}/events?after=0&limit=1000`);
        assert.equal(hist.status, 200, safeJson(hist.body));
        assert.equal(hist.body.lastSeq, lastSeq);
        assert.deepStrictEqual(hist.body.events.map((e) => [e.seq, e.event]),
          seedEvents.map((e) => [e.payload.seq, e.event]), 'the history is the same sequence');
      });

      t.diagnostic(`run took ${runMs} ms, ${lastSeq} events`);
    } finally {
      clearTimeout(fallback);
      closeAll(sockets);
    }
  });
});
