// A fake LLM HTTP server for the orchestrator tests: plain node:http, loopback only.
//
// It speaks the real streaming wire formats:
// - Ollama   `POST /api/chat`: NDJSON, one
//   `{"model","created_at","message":{"role":"assistant","content":tok},"done":false}` line per
//   token, then a final `{"model","created_at","message":{"role":"assistant","content":""},
//   "done":true,"done_reason":"stop",...durations/counts}` line.
// - OpenAI   `POST /v1/chat/completions`: server-sent events, a first chunk with
//   `delta: {role: "assistant", content: ""}`, one `chat.completion.chunk` per token with
//   `delta: {content: tok}`, a last chunk with `delta: {}` and `finish_reason: "stop"`, then
//   `data: [DONE]`. With `apiKey` set, a request without `Authorization: Bearer <apiKey>` gets
//   401 with OpenAI's error body.
// Both also answer `stream: false` requests with the whole reply in one JSON body.
//
// Replies are deterministic (see replyFor): they contain the request's model id and the
// prompt text, and are streamed as `tokens` tokens (padded with filler words) with `delayMs`
// between tokens. When the first user message contains `marker` and the conversation has no
// assistant turn yet, the reply is `CLARIFICATION_NEEDED: <question>` (also streamed token by
// token); once the conversation carries the assistant's question and a later user message (the
// answer), the reply includes that answer.
//
// startFakeLlm(options) resolves to { url, port, close(), requests, reset() }:
//   url       `http://127.0.0.1:PORT` (Ollama base_url; the OpenAI base_url is `${url}/v1`)
//   requests  every request received, in arrival order:
//             { id, provider: 'ollama'|'openai'|null, method, path, headers, body, raw,
//               status, reply, receivedAt, finishedAt, aborted }
//   close()   stops the server and drops keep-alive connections

import http from 'node:http';

export const CLARIFICATION_PREFIX = 'CLARIFICATION_NEEDED:';

const DEFAULTS = {
  tokens: 30,                 // tokens per ordinary reply (the reply is padded to this length)
  delayMs: 15,                // between two streamed tokens
  firstTokenDelayMs: 0,       // before the first token
  marker: '[needs-detail]',   // a prompt containing it gets a question first
  question: (model, prompt) => `Which aspect should ${model} focus on?`,
  apiKey: null,               // OpenAI: required `Authorization: Bearer <apiKey>` when set
  failures: {},               // { [providerModelId]: n }: the first n requests for it get 500
};

/** Split text into tokens that concatenate back to it ("word", " word", …). */
export function tokenize(text) {
  return text.match(/\s*\S+/g) ?? [text];
}

/**
 * The deterministic reply to a chat request, as tokens.
 * - ask:    `CLARIFICATION_NEEDED: <question>` (prompt contains the marker, no assistant turn)
 * - answer: `[model] reply to "<prompt>" with answer "<answer>": w1 w2 …`
 * - plain:  `[model] reply to "<prompt>": w1 w2 …`
 */
export function replyFor(model, messages, opts) {
  const o = { ...DEFAULTS, ...opts };
  const list = Array.isArray(messages) ? messages : [];
  const text = (m) => (typeof m?.content === 'string' ? m.content : JSON.stringify(m?.content ?? ''));
  const firstUser = list.findIndex((m) => m?.role === 'user');
  const prompt = firstUser >= 0 ? text(list[firstUser]) : '';
  const assistantAt = list.findIndex((m) => m?.role === 'assistant');
  if (assistantAt < 0) {
    if (o.marker && prompt.includes(o.marker)) {
      // Split the marker the way a real tokenizer would, so that a partial output can be a
      // proper prefix of it ("CLAR", "CLARIFICATION", …).
      return {
        kind: 'ask',
        tokens: ['CLAR', 'IFICATION', '_NE', 'EDED', ':', ...tokenize(` ${o.question(model, prompt)}`)],
      };
    }
    return { kind: 'plain', tokens: pad(tokenize(`[${model}] reply to "${prompt}":`), o.tokens) };
  }
  // The answer: the last user message after the (first) assistant turn.
  const after = list.slice(assistantAt + 1).filter((m) => m?.role === 'user');
  const answer = after.length ? text(after[after.length - 1]) : '';
  return {
    kind: 'answer',
    answer,
    tokens: pad(tokenize(`[${model}] reply to "${prompt}" with answer "${answer}":`), o.tokens),
  };
}

function pad(tokens, n) {
  const out = [...tokens];
  for (let i = 1; out.length < n; i++) out.push(` w${i}`);
  return out;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function startFakeLlm(options = {}) {
  const opts = { ...DEFAULTS, ...options };
  const requests = [];
  const failuresLeft = { ...opts.failures };
  const sockets = new Set();
  let counter = 0;

  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const raw = Buffer.concat(chunks).toString('utf8');
      const entry = {
        id: ++counter,
        provider: null,
        method: req.method,
        path: req.url,
        headers: req.headers,
        body: undefined,
        raw,
        status: 0,
        reply: null,
        receivedAt: Date.now(),
        finishedAt: null,
        aborted: false,
      };
      requests.push(entry);
      handle(req, res, entry).catch((err) => {
        if (!res.headersSent) json(res, entry, 500, { error: String(err && err.message) });
        else res.destroy();
      });
    });
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });

  async function handle(req, res, entry) {
    const url = new URL(req.url, 'http://x');
    let provider = null;
    if (url.pathname === '/api/chat') provider = 'ollama';
    else if (url.pathname === '/v1/chat/completions') provider = 'openai';
    entry.provider = provider;
    if (!provider) return json(res, entry, 404, { error: `no route for ${req.method} ${url.pathname}` });
    if (req.method !== 'POST') return json(res, entry, 405, { error: 'method not allowed' });

    if (provider === 'openai' && opts.apiKey) {
      if (req.headers.authorization !== `Bearer ${opts.apiKey}`) {
        return json(res, entry, 401, {
          error: {
            message: 'Incorrect API key provided.',
            type: 'invalid_request_error',
            param: null,
            code: 'invalid_api_key',
          },
        });
      }
    }

    let body;
    try {
      body = JSON.parse(entry.raw);
    } catch {
      return json(res, entry, 400, provider === 'ollama'
        ? { error: 'invalid JSON body' }
        : { error: { message: 'We could not parse the JSON body of your request.', type: 'invalid_request_error', param: null, code: null } });
    }
    entry.body = body;
    const model = typeof body?.model === 'string' ? body.model : '';
    if (!model || !Array.isArray(body.messages)) {
      return json(res, entry, 400, provider === 'ollama'
        ? { error: 'model and messages are required' }
        : { error: { message: "'model' and 'messages' are required", type: 'invalid_request_error', param: null, code: null } });
    }
    if (failuresLeft[model] > 0) {
      failuresLeft[model] -= 1;
      return json(res, entry, 500, provider === 'ollama'
        ? { error: 'injected failure' }
        : { error: { message: 'injected failure', type: 'server_error', param: null, code: null } });
    }

    const reply = replyFor(model, body.messages, opts);
    entry.reply = { kind: reply.kind, text: reply.tokens.join(''), answer: reply.answer };
    let closed = false;
    res.on('close', () => {
      closed = true;
      if (!res.writableFinished) entry.aborted = true;
    });
    // Ollama streams unless stream is false; OpenAI streams only when stream is true.
    const stream = provider === 'ollama' ? body.stream !== false : body.stream === true;
    const created = Math.floor(Date.now() / 1000);
    const id = `chatcmpl-fake${entry.id}`;

    if (!stream) {
      await sleep(opts.firstTokenDelayMs + opts.delayMs * reply.tokens.length);
      const text = reply.tokens.join('');
      if (provider === 'ollama') {
        return json(res, entry, 200, {
          model, created_at: new Date().toISOString(),
          message: { role: 'assistant', content: text }, done: true, done_reason: 'stop',
          ...ollamaStats(reply.tokens.length),
        });
      }
      return json(res, entry, 200, {
        id, object: 'chat.completion', created, model, system_fingerprint: 'fp_fake',
        choices: [{ index: 0, message: { role: 'assistant', content: text }, logprobs: null, finish_reason: 'stop' }],
        usage: { prompt_tokens: 10, completion_tokens: reply.tokens.length, total_tokens: 10 + reply.tokens.length },
      });
    }

    entry.status = 200;
    if (provider === 'ollama') {
      res.writeHead(200, { 'content-type': 'application/x-ndjson' });
    } else {
      res.writeHead(200, {
        'content-type': 'text/event-stream; charset=utf-8',
        'cache-control': 'no-cache',
        connection: 'keep-alive',
      });
    }
    const chunk = (delta, finish) => ({
      id, object: 'chat.completion.chunk', created, model, system_fingerprint: 'fp_fake',
      choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }],
    });
    if (provider === 'openai') res.write(`data: ${JSON.stringify(chunk({ role: 'assistant', content: '' }, null))}\n\n`);
    if (opts.firstTokenDelayMs > 0) await sleep(opts.firstTokenDelayMs);
    for (let i = 0; i < reply.tokens.length; i++) {
      if (i > 0) await sleep(opts.delayMs);
      if (closed) return;
      const tok = reply.tokens[i];
      if (provider === 'ollama') {
        res.write(JSON.stringify({
          model, created_at: new Date().toISOString(),
          message: { role: 'assistant', content: tok }, done: false,
        }) + '\n');
      } else {
        res.write(`data: ${JSON.stringify(chunk({ content: tok }, null))}\n\n`);
      }
    }
    if (closed) return;
    if (provider === 'ollama') {
      res.end(JSON.stringify({
        model, created_at: new Date().toISOString(),
        message: { role: 'assistant', content: '' }, done: true, done_reason: 'stop',
        ...ollamaStats(reply.tokens.length),
      }) + '\n');
    } else {
      res.write(`data: ${JSON.stringify(chunk({}, 'stop'))}\n\n`);
      res.end('data: [DONE]\n\n');
    }
    entry.finishedAt = Date.now();
  }

  function json(res, entry, status, value) {
    entry.status = status;
    const text = JSON.stringify(value);
    res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    res.end(text);
    entry.finishedAt = Date.now();
  }

  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      resolve({
        url: `http://127.0.0.1:${port}`,
        port,
        requests,
        options: opts,
        /** Forget the recorded requests (keeps the array identity). */
        reset() { requests.length = 0; },
        close() {
          return new Promise((done) => {
            server.close(() => done());
            for (const s of sockets) s.destroy();
          });
        },
      });
    });
  });
}

function ollamaStats(evalCount) {
  return {
    total_duration: 1_000_000 * (evalCount + 5),
    load_duration: 1_000_000,
    prompt_eval_count: 10,
    prompt_eval_duration: 2_000_000,
    eval_count: evalCount,
    eval_duration: 1_000_000 * evalCount,
  };
}
