/* Decoding only the window of a JPEG that a crop will use, at a reduced size, through
 * libjpeg-turbo (jpeg.py loads this with ctypes and says why).
 *
 * DCT scaling (scale_num / 8) makes the inverse DCT produce fewer pixels; jpeg_crop_scanline
 * limits the inverse DCT, upsampling and colour conversion to the window's columns (widened to
 * whole iMCUs, hence `x_offset`); jpeg_skip_scanlines skips the rows above it without inverse
 * DCT; the rows below are never read. Any libjpeg warning (truncated data, corrupt entropy
 * codes) fails the call, so a damaged file is reported rather than decoded into grey.
 */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

typedef struct {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  char *message; /* JMSG_LENGTH_MAX bytes from the caller */
} Errors;

static void fail(j_common_ptr cinfo) {
  Errors *err = (Errors *)cinfo->err;
  (*cinfo->err->format_message)(cinfo, err->message);
  longjmp(err->jump, 1);
}

static void warn_as_error(j_common_ptr cinfo, int level) {
  if (level < 0) fail(cinfo); /* level -1 is a warning: corrupt or truncated data */
}

/* Declares `cinfo` reading `data`, its header read; a libjpeg error or warning anywhere after
 * this returns 1 from the calling function, with `message` set. */
#define OPEN(cinfo, data, size, message)   \
  struct jpeg_decompress_struct cinfo;     \
  Errors err;                              \
  cinfo.err = jpeg_std_error(&err.pub);    \
  err.pub.error_exit = fail;               \
  err.pub.emit_message = warn_as_error;    \
  err.message = message;                   \
  jpeg_create_decompress(&cinfo);          \
  if (setjmp(err.jump)) {                  \
    jpeg_destroy_decompress(&cinfo);       \
    return 1;                              \
  }                                        \
  jpeg_mem_src(&cinfo, data, size);        \
  jpeg_read_header(&cinfo, TRUE);

/* Header only: width, height and whether libjpeg can give RGB (not for CMYK / YCCK).
 * Returns 0, or 1 with `message` set. */
int jv_jpeg_header(const unsigned char *data, unsigned long size, int *width, int *height,
                   int *rgb, char *message) {
  OPEN(cinfo, data, size, message)
  *width = (int)cinfo.image_width;
  *height = (int)cinfo.image_height;
  *rgb = cinfo.jpeg_color_space == JCS_YCbCr || cinfo.jpeg_color_space == JCS_GRAYSCALE ||
         cinfo.jpeg_color_space == JCS_RGB;
  jpeg_destroy_decompress(&cinfo);
  return 0;
}

/* The RGB rows [y, y + h) of the image decoded at scale_num / 8, columns [x, x + w) widened to
 * whole iMCUs: `out` holds h * out_width * 3 bytes, where out_width is at most `capacity`
 * pixels; the requested column x is at *x_offset within each row. Returns 0, or 1 with `message`
 * set. */
int jv_jpeg_decode(const unsigned char *data, unsigned long size, int scale_num, int x, int y,
                   int w, int h, unsigned char *out, int capacity, int *out_width, int *x_offset,
                   char *message) {
  JSAMPROW rows[16];
  OPEN(cinfo, data, size, message)
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = (unsigned int)scale_num;
  cinfo.scale_denom = 8;
  jpeg_start_decompress(&cinfo);
  if (x < 0 || y < 0 || w <= 0 || h <= 0 || x + w > (int)cinfo.output_width ||
      y + h > (int)cinfo.output_height) {
    snprintf(message, JMSG_LENGTH_MAX, "window %dx%d+%d+%d outside the %ux%u image", w, h, x, y,
             cinfo.output_width, cinfo.output_height);
    jpeg_destroy_decompress(&cinfo);
    return 1;
  }
  JDIMENSION left = (JDIMENSION)x, width = (JDIMENSION)w;
  if (width < cinfo.output_width) jpeg_crop_scanline(&cinfo, &left, &width);
  if ((int)width > capacity) {
    snprintf(message, JMSG_LENGTH_MAX, "widened window of %u pixels exceeds the buffer", width);
    jpeg_destroy_decompress(&cinfo);
    return 1;
  }
  *out_width = (int)width;
  *x_offset = x - (int)left;
  if (y > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)y);
  int done = 0;
  while (done < h) {
    int want = h - done < 16 ? h - done : 16;
    for (int i = 0; i < want; i++) rows[i] = out + (size_t)(done + i) * width * 3;
    done += (int)jpeg_read_scanlines(&cinfo, rows, (JDIMENSION)want);
  }
  jpeg_destroy_decompress(&cinfo); /* aborts: the rows below the window are never decoded */
  return 0;
}
