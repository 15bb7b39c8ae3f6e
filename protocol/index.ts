/**
 * What a device SDK imports: framing, codec, handshake, channel, messages, errors, crypto
 * backends. Pure: nothing here opens a socket, starts a timer or reads the environment.
 */
export * from './channel.ts';
export * from './codec.ts';
export * from './crypto/index.ts';
export * from './errors.ts';
export * from './frame.ts';
export * from './handshake.ts';
export * from './messages.ts';
