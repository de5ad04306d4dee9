export { HeraldClient, HeraldError, Subscription } from './client.js';
export type { HeraldClientOptions, SessionHandlers, SubscribeOptions, SubscribeError } from './client.js';
export * from './types.js';
