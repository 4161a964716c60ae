/**
 * Logging: the client takes any object with these four methods (console, pino, winston and
 * bunyan loggers all fit, or an adapter of a few lines). Fields never hold credentials (L-1).
 */
export type LogFields = Record<string, string | number | boolean | null | undefined>;

export interface Logger {
  debug(message: string, fields?: LogFields): void;
  info(message: string, fields?: LogFields): void;
  warn(message: string, fields?: LogFields): void;
  error(message: string, fields?: LogFields): void;
}

function line(message: string, fields?: LogFields): string {
  if (fields === undefined) return `msgpipe: ${message}`;
  const parts = Object.entries(fields)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${k}=${typeof v === 'string' && /\s/.test(v) ? JSON.stringify(v) : String(v)}`);
  return parts.length === 0 ? `msgpipe: ${message}` : `msgpipe: ${message} ${parts.join(' ')}`;
}

/** The default logger: console.warn and console.error; info and debug are silent unless MSGPIPE_LOG=info|debug. */
export const consoleLogger: Logger = {
  debug(message, fields) {
    if (process.env.MSGPIPE_LOG === 'debug') console.debug(line(message, fields));
  },
  info(message, fields) {
    if (process.env.MSGPIPE_LOG === 'debug' || process.env.MSGPIPE_LOG === 'info') {
      console.info(line(message, fields));
    }
  },
  warn(message, fields) {
    console.warn(line(message, fields));
  },
  error(message, fields) {
    console.error(line(message, fields));
  },
};

/** A logger that drops everything. */
export const silentLogger: Logger = {
  debug() {},
  info() {},
  warn() {},
  error() {},
};

/**
 * `uri` with the password of its userinfo replaced by `***`, whatever its length (L-1).
 * Also applied to error texts that might quote a URI.
 */
export function redactUri(uri: string): string {
  return uri.replace(/(\b[a-z][a-z0-9+.-]*:\/\/[^:/?#@\s]*:)[^@/?#\s]*@/gi, '$1***@');
}
