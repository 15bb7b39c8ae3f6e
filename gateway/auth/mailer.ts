/**
 * Email for one-time login codes, over SMTP with nodemailer. Without SMTP_HOST there is no
 * mailer: the gateway starts, warns once, and `otp.request` answers `forbidden`.
 */
import nodemailer, { type Transporter } from 'nodemailer';

export interface MailerOptions {
  host: string;
  port: number;
  /** Implicit TLS (usually port 465). */
  secure: boolean;
  /** Refuse to send without STARTTLS. */
  requireTls: boolean;
  /** Accept self-signed certificates (test servers only). */
  tlsRejectUnauthorized: boolean;
  user?: string;
  password?: string;
  from: string;
}

export class Mailer {
  private readonly transport: Transporter;

  constructor(private readonly o: MailerOptions) {
    this.transport = nodemailer.createTransport({
      host: o.host,
      port: o.port,
      secure: o.secure,
      requireTLS: o.requireTls,
      ...(o.user ? { auth: { user: o.user, pass: o.password ?? '' } } : {}),
      tls: { rejectUnauthorized: o.tlsRejectUnauthorized },
    });
  }

  async sendCode(to: string, code: string, minutes: number): Promise<void> {
    await this.transport.sendMail({
      from: this.o.from,
      to,
      subject: `Your login code: ${code}`,
      text: `Your login code is ${code}. It expires in ${minutes} minutes. If you did not ask for it, ignore this email.`,
    });
  }

  close(): void {
    this.transport.close();
  }
}
