export { AUTH_ERROR_CODES, HeraldAuthError, HeraldClient, HeraldError, Subscription, authErrorFromMessage } from './client.js';
export type {
  AuthErrorCode,
  HeraldClientOptions,
  SessionHandlers,
  SubscribeOptions,
  SubscribeError,
  TokenSource,
} from './client.js';
export * from './types.js';
