/** A real SMTP server on loopback (smtp-server) that keeps what it receives. */
import { SMTPServer } from 'smtp-server';
import { within } from './deadline.ts';

export interface Mail {
  to: string[];
  raw: string;
}

export interface SmtpSink {
  port: number;
  mails: Mail[];
  /** Resolves with the next mail to `to` (or one already received and not yet taken). */
  next(to: string, timeoutMs?: number): Promise<Mail>;
  close(): Promise<void>;
}

export async function startSmtpSink(): Promise<SmtpSink> {
  const mails: Mail[] = [];
  const taken = new Set<Mail>();
  const waiters: { to: string; resolve: (m: Mail) => void }[] = [];
  const server = new SMTPServer({
    authOptional: true,
    disabledCommands: ['STARTTLS', 'AUTH'],
    logger: false,
    onData(stream, session, callback) {
      const chunks: Buffer[] = [];
      stream.on('data', (c) => chunks.push(c));
      stream.on('end', () => {
        const mail = {
          to: session.envelope.rcptTo.map((r) => r.address),
          raw: Buffer.concat(chunks).toString(),
        };
        mails.push(mail);
        const w = waiters.find((x) => mail.to.includes(x.to));
        if (w) {
          waiters.splice(waiters.indexOf(w), 1);
          taken.add(mail);
          w.resolve(mail);
        }
        callback();
      });
    },
  });
  // smtp-server emits a client's socket errors on the server: a gateway stopped with its pooled
  // SMTP connection open resets it (ECONNRESET), which without a listener ends the test file.
  server.on('error', () => {});
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', () => resolve()));
  const port = (server.server.address() as { port: number }).port;
  return {
    port,
    mails,
    next(to, timeoutMs = 5000) {
      const m = mails.find((x) => !taken.has(x) && x.to.includes(to));
      if (m) {
        taken.add(m);
        return Promise.resolve(m);
      }
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new Error(`no mail to ${to}`)), timeoutMs);
        waiters.push({
          to,
          resolve: (x) => {
            clearTimeout(t);
            resolve(x);
          },
        });
      });
    },
    close: () =>
      within('the SMTP sink to close', new Promise<void>((resolve) => server.close(() => resolve()))),
  };
}

/** The 6-digit code in a login mail. */
export function codeOf(mail: Mail): string {
  const m = /login code is (\d{6})/.exec(mail.raw);
  if (!m) throw new Error('no code in the mail');
  return m[1];
}
