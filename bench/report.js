'use strict';
// Builds the markdown report of bench/run.sh from the JSON files in $OUT.
const fs = require('node:fs');
const path = require('node:path');

const env = process.env;
const OUT = env.OUT;
const servers = (env.SERVERS || 'herald node').split(/\s+/).filter(Boolean);

function readJson(file) {
  try {
    return JSON.parse(fs.readFileSync(path.join(OUT, file), 'utf8'));
  } catch {
    return null;
  }
}
function readJsonl(file) {
  try {
    return fs
      .readFileSync(path.join(OUT, file), 'utf8')
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l));
  } catch {
    return [];
  }
}
function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? s[Math.floor((s.length - 1) / 2)] : undefined;
}

const data = {};
for (const s of servers) {
  const idle = readJson(`${s}-idle.json`);
  const runs = readJsonl(`${s}-fanout.jsonl`).filter((r) => r.result);
  // The run with the median throughput represents the server (its latencies come with it).
  const sorted = [...runs].sort((a, b) => a.result.msgsPerSec - b.result.msgsPerSec);
  const med = sorted.length ? sorted[Math.floor((sorted.length - 1) / 2)] : null;
  const loss = runs.reduce(
    (acc, r) => {
      acc.missing += r.result.missing;
      acc.duplicates += r.result.duplicates;
      acc.outOfOrder += r.result.outOfOrder;
      acc.problems += r.result.problems.count + r.result.serverErrors;
      acc.failedRuns += r.exit === 0 ? 0 : 1;
      return acc;
    },
    { missing: 0, duplicates: 0, outOfOrder: 0, problems: 0, failedRuns: 0 },
  );
  loss.failedRuns += readJsonl(`${s}-fanout.jsonl`).length - runs.length;
  let warnings;
  try {
    warnings = Number(fs.readFileSync(path.join(OUT, `${s}-fanout.warnings`), 'utf8').trim() || 0);
  } catch {
    warnings = undefined;
  }
  const perConn =
    idle && idle.ready > 0 ? (idle.rssAfterKiB - idle.rssBeforeKiB) / idle.ready : undefined;
  data[s] = {
    idle,
    perConn,
    warnings,
    runs,
    med,
    loss,
    throughputs: runs.map((r) => r.result.msgsPerSec),
  };
}

const fmt = (v, d = 0) =>
  v === undefined || v === null || Number.isNaN(v)
    ? 'n/a'
    : Number(v).toLocaleString('en-US', { minimumFractionDigits: d, maximumFractionDigits: d });
const ratio = (a, b, d = 2) =>
  a === undefined || b === undefined || a === null || b === null || !b ? 'n/a' : `${(a / b).toFixed(d)}x`;

const A = servers[0];
const B = servers[1];
const rows = [];
function row(label, get, d = 0) {
  const va = data[A] ? get(data[A]) : undefined;
  const vb = B && data[B] ? get(data[B]) : undefined;
  const cells = [label, fmt(va, d)];
  if (B) cells.push(fmt(vb, d), ratio(va, vb));
  rows.push(`| ${cells.join(' | ')} |`);
}

const lines = [];
lines.push(`# herald benchmark — ${env.STAMP}`);
lines.push('');
lines.push(`herald commit ${env.GIT_REV}; Node ${process.version}, socket.io ${require(path.join(__dirname, 'node-reference/node_modules/socket.io/package.json')).version}.`);
lines.push(`Machine: ${env.MACHINE}. Server pinned to CPU ${env.SERVER_CPU}, load generator to CPU ${env.LOADGEN_CPU}.`);
lines.push(`Load average (1/5/15 min) before the build: ${env.LOADAVG_START}; at the end: ${env.LOADAVG_END} (the bench itself keeps ~2 busy).`);
if (env.HERALD_ARGS) lines.push(`herald extra flags: \`${env.HERALD_ARGS}\`.`);
lines.push(
  `Fan-out: ${env.FANOUT_CLIENTS} clients / ${env.FANOUT_SESSIONS} sessions, ${env.FANOUT_EVENTS} progress events per session ` +
    `(batch ${env.FANOUT_BATCH}, ${env.FANOUT_PRODUCERS} producers, window ${env.FANOUT_WINDOW}), ` +
    `median of ${env.FANOUT_RUNS} runs after a warm-up. Idle: ${env.IDLE_CLIENTS} subscribed websocket clients ` +
    `over ${env.IDLE_SESSIONS} sessions, RSS ${env.SETTLE_SECS} s after all are subscribed.`,
);
lines.push('');
const header = B ? `| metric | ${A} | ${B} | ${A}/${B} |` : `| metric | ${A} |`;
rows.push(header, B ? '|---|---:|---:|---:|' : '|---|---:|');
row('fan-out throughput, msgs/s (median run)', (x) => x.med && x.med.result.msgsPerSec);
{
  const cells = ['fan-out throughput, msgs/s (all runs)', data[A] ? data[A].throughputs.map((v) => fmt(v)).join(' / ') : 'n/a'];
  if (B) cells.push(data[B] ? data[B].throughputs.map((v) => fmt(v)).join(' / ') : 'n/a', '');
  rows.push(`| ${cells.join(' | ')} |`);
}
row('latency POST→receipt p50, ms', (x) => x.med && x.med.result.latencyMs.p50, 2);
row('latency POST→receipt p99, ms', (x) => x.med && x.med.result.latencyMs.p99, 2);
row('latency POST→receipt max, ms', (x) => x.med && x.med.result.latencyMs.max, 2);
row('POST round trip p50, ms', (x) => x.med && x.med.result.postMs.p50, 2);
row('server CPU during the median run (incl. connecting), s', (x) => x.med && x.med.serverCpuSecs, 2);
row('server CPU per 1,000 delivered msgs, ms', (x) => x.med && (1e6 * x.med.serverCpuSecs) / x.med.result.delivered, 2);
row('load generator CPU, % of its core', (x) => x.med && x.med.result.loadgenCpuPct, 0);
{
  const l = (s) => (data[s] ? `${data[s].loss.missing} / ${data[s].loss.duplicates} / ${data[s].loss.outOfOrder}` : 'n/a');
  rows.push(B ? `| missing / duplicate / out-of-order (all runs) | ${l(A)} | ${l(B)} | |` : `| missing / duplicate / out-of-order (all runs) | ${l(A)} |`);
  const p = (s) => (data[s] ? `${data[s].loss.problems} / ${data[s].loss.failedRuns}` : 'n/a');
  rows.push(B ? `| protocol problems / failed runs | ${p(A)} | ${p(B)} | |` : `| protocol problems / failed runs | ${p(A)} |`);
  const w = (s) => (data[s] && data[s].warnings !== undefined ? String(data[s].warnings) : 'n/a');
  rows.push(B ? `| server log warnings/errors during fan-out | ${w(A)} | ${w(B)} | |` : `| server log warnings/errors during fan-out | ${w(A)} |`);
}
row('idle: RSS before connecting, KiB', (x) => x.idle && x.idle.rssBeforeKiB);
row('idle: RSS with all clients subscribed, KiB', (x) => x.idle && x.idle.rssAfterKiB);
row('idle: memory per subscribed connection, KiB', (x) => x.perConn, 1);
row('idle: connect+subscribe rate, /s', (x) => x.idle && x.idle.result && x.idle.result.connectsPerSec);
lines.push(...rows);
lines.push('');

if (B && data[A] && data[B]) {
  const tA = data[A].med && data[A].med.result.msgsPerSec;
  const tB = data[B].med && data[B].med.result.msgsPerSec;
  const mA = data[A].perConn;
  const mB = data[B].perConn;
  const ok = (c) => (c ? 'met' : 'NOT met');
  lines.push('Targets:');
  lines.push(
    `- fan-out throughput ≥ 3x ${B}: ${ratio(tA, tB)} — ${tA && tB ? ok(tA >= 3 * tB && data[A].loss.missing === 0) : 'n/a'}`,
  );
  for (const s of [A, B]) {
    const cpu = data[s].med && data[s].med.result.loadgenCpuPct;
    if (cpu > 80) {
      lines.push(
        `- note: the load generator used ${cpu.toFixed(0)}% of its core during ${s}'s median run, so ${s}'s throughput ` +
          'is close to what one load-generator core can receive: read it as a lower bound (the CPU-per-message row does not depend on it).',
      );
    }
  }
  lines.push(`- memory per idle subscribed connection ≤ ${B}'s: ${fmt(mA, 1)} vs ${fmt(mB, 1)} KiB — ${mA !== undefined && mB !== undefined ? ok(mA <= mB) : 'n/a'}`);
  lines.push('');
}
lines.push(`Raw results: bench/results/${env.STAMP}/`);
console.log(lines.join('\n'));
