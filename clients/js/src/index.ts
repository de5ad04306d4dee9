export { AUTH_ERROR_CODES, HeraldAuthError, HeraldClient, HeraldError, SessionFeed, Subscription, authErrorFromMessage } from './client.js';
export type {
  AuthErrorCode,
  HeraldClientOptions,
  SessionFeedHandlers,
  SessionHandlers,
  SubscribeOptions,
  SubscribeError,
  TokenSource,
} from './client.js';
export * from './types.js';
